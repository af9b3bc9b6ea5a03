"""medgen-augment's insertion arms: --insert NAME=PAINTER[:CHECKPOINT] sets (real train scans with
new lesions painted in) beside the whole-image sets, every set adding one lesion per image; bad
combinations refused in one line naming the flag before anything runs; the added lesions counted
from each set's files; the verdicts (who wins in which bin, insertion against copy-paste) follow
from the numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import square_seg_model
from datagen import write_dataset

from medgen.evaluation import arms
from medgen.scripts.augment import main


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A real set (bravo, 32x32x8), a 2D synthetic set and two files standing in for checkpoints."""
    root = tmp_path_factory.mktemp("augment_insert")
    write_dataset(root / "real", n_patients=4, splits=("train", "train", "test"), keys=("bravo", "seg"))
    write_dataset(root / "s2d", n_patients=2, shape=(32, 32, 1), keys=("bravo", "seg"))
    for name in ("seg.pt", "bravo.pt"):
        (root / name).write_bytes(b"")
    return {p.name: p for p in root.iterdir()}


@pytest.mark.cli
@pytest.mark.parametrize("extra, message", [
    (["--insert", "a"], "config error at '--insert': 'a': use NAME=PAINTER or NAME=PAINTER:CHECKPOINT, the painter "
                        "one of copy, repaint, inpaint"),
    (["--insert", "a=paint"], "config error at '--insert': 'a=paint': use NAME=PAINTER"),
    (["--insert", "a=repaint"], "config error at '--insert a': the repaint painter needs the checkpoint that paints: "
                                "give --image or a=repaint:CHECKPOINT"),
    (["--insert-target", "tiny:1"], "config error at '--insert-target': it sets the sizes of the --insert sets, and "
                                    "there are none"),
    (["--insert", "a=copy", "--insert", "a=copy"], "config error at '--insert': the name 'a' is given twice"),
    (["--insert", "a=copy", "--guidance", "2"], "config error at '--guidance': it is for the --target sets (whole "
                                                "images), and there are none"),
    (["--insert", "a=copy", "--seg", "{seg}"], "config error at '--seg': it is for the --target sets"),
    (["--seg", "{seg}", "--image", "{bravo}", "--generate", "insert.margin=3"],
     "config error at '--generate insert': it is for the --insert sets, and there are none"),
    (["--insert", "a=copy", "--generate", "lesion_counts.target=uniform"],
     "config error at '--generate lesion_counts.target': set by --insert (one lesion per image in every set"),
    (["--insert", "a=copy", "--generate", "insert.painter=copy"], "config error at '--generate insert.painter': set "
                                                                  "by --insert"),
    (["--insert", "a=copy", "--insert-target", "tiny:1,huge:1", "--generate", "insert.image_size=16"], "config error at '--insert-target': "
                                                                 "lesion_sizes.target: unknown class 'huge'"),
    (["--insert", "a=copy", "--insert-target", "tiny:x"], "config error at '--insert-target': 'tiny:x': use "
                                                          "real|uniform or BIN:WEIGHT"),
    # copy without a checkpoint reads the scans at the size given, and there is none
    (["--insert", "a=copy"], "config error at '--generate insert.image_size': insert.painter=copy without "
                             "image_checkpoint"),
    (["--seg", "{seg}", "--image", "{bravo}", "--target", "a=real", "--insert", "a=copy"],
     "config error at '--insert': the name 'a' is given twice (also a --target)"),
    (["--synthetic", "x={s2d}", "--insert", "a=copy", "--insert-target", "tiny:1"],
     "config error at '--insert, --insert-target': these generate the synthetic sets, and --synthetic gives them"),
])
def test_a_bad_insertion_setting_is_one_line_before_anything_runs(folders, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    extra = [e.format(**{k.removesuffix(".pt"): str(v) for k, v in folders.items()}) for e in extra]
    with pytest.raises(SystemExit) as exit_info:
        main(["--real", str(folders["real"]), "--out", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith(f"medgen-augment: {message}"), err
    assert "\n" not in err and not out.exists()


@pytest.mark.cli
def test_a_missing_painter_checkpoint_names_its_set(folders, tmp_path, capsys):
    missing = tmp_path / "inpaint.pt"
    with pytest.raises(SystemExit) as exit_info:
        main(["--real", str(folders["real"]), "--out", str(tmp_path / "out"), "--insert", f"fill=inpaint:{missing}"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == f"medgen-augment: --insert fill={missing}: {missing} does not exist"


def _result(means: dict[str, list[float]], stds: dict[str, list[float]], painters: dict[str, str]) -> dict:
    """A hand-made augmentation.json: sensitivity means/stds per arm over the bins tiny, small, large
    (large has no test lesion)."""
    bins = ["tiny", "small", "large"]

    def entry(values):
        return {b: {"sensitivity": v} for b, v in zip([*bins, "all"], values)}

    return {"bins": bins, "test_lesions": {"tiny": 10, "small": 20, "large": 0},
            "synthetic": {n: {"kind": "insertion", "painter": p} for n, p in painters.items()},
            "sets": {n: {"mean": entry(means[n]), "std": entry(stds[n])} for n in means}}


def test_the_verdicts_follow_from_the_numbers():
    result = _result(
        means={"real": [0.30, 0.80, None, 0.60], "real+paste": [0.40, 0.85, None, 0.701],
               "real+paint": [0.55, 0.83, None, 0.699]},
        stds={"real": [0.05, 0.02, None, 0.01], "real+paste": [0.04, 0.03, None, 0.02],
              "real+paint": [0.10, 0.01, None, 0.03]},
        painters={"paste": "copy", "paint": "repaint"})
    assert arms.verdicts(result) == [
        # 0.55 - 0.40 = 0.15 > max(0.10, 0.04)
        "tiny (10 test lesions): real+paint wins (sensitivity 0.55 ± 0.10), 0.15 ahead of real+paste (0.40 ± 0.04), "
        "more than the seed spread (0.10).",
        # 0.85 - 0.83 = 0.02 < max(0.03, 0.01)
        "small (20 test lesions): real+paste wins (sensitivity 0.85 ± 0.03), 0.02 ahead of real+paint (0.83 ± 0.01), "
        "within the seed spread (0.03): no clear winner.",
        "all (30 test lesions): real+paste and real+paint tie at sensitivity 0.70 (two decimals)."]  # large: none
    rows = arms.insertion_vs_copy(result)
    assert [(r["insertion"], r["copy"], r["bin"]) for r in rows] == [("paint", "paste", "tiny"), ("paint", "paste", "small")]
    assert rows[0]["minus_copy"] == pytest.approx(0.15) and rows[0]["minus_real"] == pytest.approx(0.25)
    assert rows[0]["spread"] == 0.10 and rows[1]["minus_copy"] == pytest.approx(-0.02)
    title, header, body, _ = arms.comparison_table(rows)
    assert body[0][-3:] == ["+0.15 (> spread)", "+0.25 (> spread)", "0.10"]
    assert body[1][-3:] == ["-0.02", "+0.03", "0.03"]  # 0.83 - 0.80 = 0.03, not beyond the spread 0.03


def test_an_insertion_set_adds_the_lesions_touching_its_regions(tmp_path):
    import nibabel as nib
    import numpy as np

    sample = tmp_path / "train" / "ins_000000"
    sample.mkdir(parents=True)
    seg, region = np.zeros((16, 16, 1), np.float32), np.zeros((16, 16, 1), np.float32)
    seg[1:3, 1:3] = 1  # the scan's own lesion: 2 px
    seg[8:13, 8:10] = 1  # the painted one: 5 x 2 px
    region[7:14, 7:11] = 1
    for name, array in (("seg", seg), ("region", region)):
        nib.save(nib.Nifti1Image(array, np.diag([1, 1, 1, 1])), sample / f"{name}.nii.gz")
    assert arms.is_insertion([sample])
    # measured at 2 mm pixels of 16 px masks: the 5 x 2 px lesion, corner to corner
    assert arms.added_diameters([sample], (2.0, 2.0), (16, 16)).tolist() == pytest.approx([2 * np.hypot(5, 2)])
    # files of twice the size of the test masks: half the pixel size
    assert arms.added_diameters([sample], (2.0, 2.0), (8, 8)).tolist() == pytest.approx([np.hypot(5, 2)])


@pytest.mark.slow
def test_the_four_arms_add_equal_lesions_and_the_report_says_who_wins(tmp_path, tiny_data, tiny_checkpoints,
                                                                     monkeypatch):
    square_seg_model(monkeypatch, [2])  # one tiny square lesion per mask
    out = tmp_path / "arms"
    args = ["--real", str(tiny_data), "--seg", str(tiny_checkpoints["seg"]), "--image", str(tiny_checkpoints["bravo"]),
            "--out", str(out), "--target", "synthesis=tiny:1", "--insert", "paste=copy", "--insert", "paint=repaint",
            "--insert-target", "tiny:1", "--num-images", "4", "--seeds", "0,1", "--steps", "3",
            "--generate", "gate.max_area=0.5", "--generate", "steps=2", "--generate", "precision=fp32",
            "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    result = json.loads((out / "augmentation.json").read_text())
    assert list(result["sets"]) == ["real", "real+synthesis", "real+paste", "real+paint"]
    syn = result["synthetic"]
    assert {n: (s["kind"], s["painter"]) for n, s in syn.items()} == {
        "synthesis": ("whole image", None), "paste": ("insertion", "copy"), "paint": ("insertion", "repaint")}
    for name in syn:  # every arm adds 4 tiny lesions, counted on its files
        assert syn[name]["added"] == {"tiny": 4, "small": 0, "medium": 0, "large": 0}, name
    # the insertion sets' masks also hold the scans' own lesions
    assert sum(syn["paste"]["lesions"].values()) >= 4 and syn["synthesis"]["lesions"] == syn["synthesis"]["added"]
    assert result["verdicts"] == arms.verdicts(result) and result["verdicts"]
    assert [r["bin"] for r in result["insertion_vs_copy"]] == [b for b, n in result["test_lesions"].items() if n]
    report = (out / "augmentation.md").read_text()
    assert "| paint | insertion (repaint) | 4 | 4 | 0 | 0 | 0 |" in report
    assert "| synthesis | whole image | 4 | 4 | 0 | 0 | 0 | 4 | 0 | 0 | 0 |" in report
    assert "## Insertion against copy-paste" in report and f"- Who wins — {result['verdicts'][0]}" in report
    assert (out / "synthetic_paint" / "manifest.csv").is_file()


@pytest.mark.cli
def test_the_insertion_flags_reach_generation(folders, tmp_path, monkeypatch):
    """--insert and --insert-target, with the generation and the experiment replaced by recorders:
    each insertion set paints into --real's train scans with its painter and checkpoint (--image
    unless given), at --insert-target's sizes; every set, the whole-image one too, adds one lesion per
    image; masks_from (real masks for the whole-image sets) stays with the whole-image sets."""
    from types import SimpleNamespace

    import medgen.evaluation.augmentation as augmentation
    import medgen.generation.pipeline as pipeline

    seen = {"generate": []}
    monkeypatch.setattr(pipeline, "run_generation",
                        lambda cfg, progress=True, command="": seen["generate"].append(cfg) or SimpleNamespace(status="done"))
    monkeypatch.setattr(augmentation, "run_experiment",
                        lambda cfg, sets, out_dir, device, progress=True: seen.update(sets=sets) or {"sets": {}})
    other = tmp_path / "inpaint.pt"
    other.write_bytes(b"")
    out = tmp_path / "out"
    assert main(["--real", str(folders["real"]), "--out", str(out), "--image", str(folders["bravo.pt"]),
                 "--target", "whole=tiny:1", "--generate", f"masks_from={folders['real']}", "--generate",
                 "masks_split=train", "--insert", "paste=copy", "--insert", "paint=repaint",
                 "--insert", f"fill=inpaint:{other}", "--insert-target", "tiny:2,small:1", "--num-images", "6",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    cfgs = {Path(c.out_dir).name: c for c in seen["generate"]}
    assert list(cfgs) == ["synthetic_whole", "synthetic_paste", "synthetic_paint", "synthetic_fill"]
    assert seen["sets"] == {n: out / f"synthetic_{n}" for n in ("whole", "paste", "paint", "fill")}
    whole = cfgs.pop("synthetic_whole")
    assert (whole.insert.into, whole.masks_from, whole.seg_checkpoint) == (None, str(folders["real"]), None)
    assert whole.lesion_sizes.target == {"tiny": 1.0}
    assert {k: (c.insert.painter, c.image_checkpoint) for k, c in cfgs.items()} == {
        "synthetic_paste": ("copy", str(folders["bravo.pt"])), "synthetic_paint": ("repaint", str(folders["bravo.pt"])),
        "synthetic_fill": ("inpaint", str(other))}
    for c in cfgs.values():
        assert (c.insert.into, c.insert.split, c.masks_from, c.num_images) == (str(folders["real"]), "train", None, 6)
        assert c.lesion_sizes.target == {"tiny": 2.0, "small": 1.0}
    for c in [whole, *cfgs.values()]:
        assert dict(c.lesion_counts.target) == {"1": 1}
