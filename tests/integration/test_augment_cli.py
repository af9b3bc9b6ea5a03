"""medgen-augment's command line: every flag it accepts is used or refused in one line naming it,
before anything is generated, trained or written; the downstream budget (bf16 included) reaches
the segmenters' training; the cache follows MEDGEN_CACHE_DIR. No model is trained here."""

from __future__ import annotations

from pathlib import Path

import pytest
from datagen import write_dataset

from medgen.scripts.augment import main, parse_target

pytestmark = pytest.mark.cli


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A real set (bravo, 32x32x8: 3 train and 1 test patients), 2D and 3D synthetic sets of bravo,
    a 2D set of t1_pre + t1_gd the real set lacks, and two files standing in for checkpoints."""
    root = tmp_path_factory.mktemp("augment_cli")
    write_dataset(root / "real", n_patients=4, splits=("train", "train", "test"), keys=("bravo", "seg"))
    write_dataset(root / "s2d", n_patients=2, shape=(32, 32, 1), keys=("bravo", "seg"))
    write_dataset(root / "s3d", n_patients=2, shape=(32, 32, 8), keys=("bravo", "seg"))
    write_dataset(root / "dual", n_patients=2, shape=(32, 32, 1), keys=("t1_pre", "t1_gd", "seg"))
    for name in ("seg.pt", "bravo.pt"):
        (root / name).write_bytes(b"")
    return {p.name: p for p in root.iterdir()}


def _refused(capsys, argv: list[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return exit_info.value.code, err


@pytest.mark.parametrize("extra, message", [
    (["--generate", "nosuchkey=1"], "config error at '--generate nosuchkey': Key 'nosuchkey' not in 'GenerateConfig'"),
    (["--generate", "steps"], "config error at '--generate': 'steps': use KEY=VALUE"),
    (["--generate", "gate.max_area=2"], "config error at '--generate gate.max_area': need gate.min_area"),
    (["--generate", "num_images=3"], "config error at '--generate num_images': set by --num-images: use that flag"),
    (["--generate", "seed=3"], "config error at '--generate seed': set by --seed"),
    (["--generate", "format=nnunet"], "config error at '--generate format': nnunet: medgen-augment reads its sets in "
                                      "medgen's layout"),
    (["--seeds", "a"], "config error at '--seeds': 'a': use integers >= 0 separated by commas, e.g. 0,1,2"),
    (["--seeds", "0,1,0"], "config error at '--seeds': '0,1,0': seed 0 is given twice"),
    (["--steps", "0"], "config error at '--steps': must be >= 1, got 0"),
    (["--num-images", "0"], "config error at '--num-images': must be >= 1"),
    (["--seed", "-1"], "config error at '--seed': must be >= 0, got -1"),
    (["--guidance", "-1"], "config error at '--guidance': must be >= 0"),
    (["--target", "tiny:4"], "config error at '--target': --target 'tiny:4': use NAME=real|uniform or "
                             "NAME=tiny:4,small:2,..."),
    (["--target", "a=real", "--target", "a=uniform"], "config error at '--target': the name 'a' is given twice"),
    (["--target", "a/b=real"], "config error at '--target': 'a/b': a set's name is letters, digits"),
    # every target is checked before the first is generated: `ok` is not generated either
    (["--target", "ok=real", "--target", "bad=tiny:1,huge:2"], "config error at '--target bad': lesion_sizes.target: "
                                                               "unknown class 'huge'"),
    (["--generate", "lesion_sizes.bins=[3,6]"], "config error at '--target small (a default target)': "
                                                "lesion_sizes.target: unknown class 'tiny'"),
])
def test_a_bad_generation_setting_is_one_line_before_anything_is_generated(folders, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    code, err = _refused(capsys, ["--real", str(folders["real"]), "--out", str(out), "--seg", str(folders["seg.pt"]),
                                  "--image", str(folders["bravo.pt"]), *extra])
    assert code == 2 and err.startswith(f"medgen-augment: {message}"), err
    assert not out.exists()


def test_missing_inputs_name_their_flag(folders, tmp_path, capsys):
    real, out = str(folders["real"]), str(tmp_path / "out")
    models = ["--seg", str(folders["seg.pt"]), "--image", str(folders["bravo.pt"])]
    assert _refused(capsys, ["--real", real, "--out", out, "--seg", str(tmp_path / "none.pt"), "--image", "x"]) == (
        1, f"medgen-augment: --seg={tmp_path / 'none.pt'}: {tmp_path / 'none.pt'} does not exist")
    assert _refused(capsys, ["--real", str(tmp_path / "nothing"), "--out", out, *models]) == (
        2, f"medgen-augment: config error at '--real': {tmp_path / 'nothing'}: no such folder")
    assert _refused(capsys, ["--real", real, "--out", str(folders["seg.pt"]), *models]) == (
        2, f"medgen-augment: config error at '--out': {folders['seg.pt']}: a file, and the results need a folder")
    assert _refused(capsys, ["--real", real, "--out", out, "--seg", str(folders["seg.pt"])]) == (
        2, "medgen-augment: config error at '--image': give --seg and --image to generate the synthetic sets, or "
           "--synthetic NAME=DIR")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, message", [
    (["--synthetic", "a"], "config error at '--synthetic': 'a': use NAME=DIR, e.g. --synthetic small=synthetic_small"),
    (["--synthetic", "=s2d"], "config error at '--synthetic': '=s2d': use NAME=DIR"),
    (["--synthetic", "a=nowhere"], "config error at '--synthetic': a=nowhere: no such folder"),
    (["--synthetic", "a=s2d", "--synthetic", "a=s2d"], "config error at '--synthetic': the name 'a' is given twice"),
    (["--synthetic", "a=s2d", "--target", "small=small:1"],
     "config error at '--target': it generates the synthetic sets, and --synthetic gives them ready-made: give one "
     "or the other"),
    (["--synthetic", "a=s2d", "--seg", "seg.pt", "--image", "bravo.pt", "--num-images", "5", "--guidance", "2",
      "--seed", "0", "--generate", "steps=5"],
     "config error at '--seg, --image, --num-images, --guidance, --seed, --generate': these generate the synthetic "
     "sets, and --synthetic gives them ready-made: give one or the other"),
    (["--synthetic", "a=s2d", "--seeds", "0,x"], "config error at '--seeds': '0,x': use integers >= 0"),
])
def test_a_bad_synthetic_set_or_a_generation_flag_beside_it_is_one_line(folders, tmp_path, capsys, monkeypatch,
                                                                        extra, message):
    monkeypatch.chdir(folders["real"].parent)  # the folders by their names
    out = tmp_path / "out"
    code, err = _refused(capsys, ["--real", "real", "--out", str(out), *extra])
    assert code == 2 and err.startswith(f"medgen-augment: {message}"), err
    assert not out.exists()


def test_sets_of_different_kinds_are_refused_naming_each_before_any_cache_or_training(folders, tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    base = ["--real", str(folders["real"]), "--out", str(out), "--cache-dir", str(cache)]
    code, err = _refused(capsys, [*base, "--synthetic", f"flat={folders['s2d']}", "--synthetic", f"deep={folders['s3d']}"])
    assert (code, err) == (1, "medgen-augment: the synthetic sets hold different kinds of data (flat: 2D slices of 32 px, "
                              "bravo; deep: 3D volumes of 32x32x8 voxels, bravo): each is stacked onto the real train "
                              "set read the same way, so give sets of one kind (one medgen-augment run per kind)")
    code, err = _refused(capsys, [*base, "--synthetic", f"a={folders['s2d']}", "--synthetic", f"d={folders['dual']}"])
    assert (code, err) == (1, f"medgen-augment: synthetic set d={folders['dual']} holds t1_pre+t1_gd but the real set "
                              f"({folders['real']}) lacks t1_pre+t1_gd")
    assert not out.exists() and not cache.exists()


class _Stop(Exception):
    """Raised by a spy to end the run at the point it checks."""


def test_bf16_reaches_the_downstream_training_and_the_cache_follows_MEDGEN_CACHE_DIR(folders, tmp_path, capsys,
                                                                                    monkeypatch):
    from medgen.evaluation import downstream

    seen = []

    def autocast(device, precision):  # the first training step of the first segmenter
        seen.append(precision)
        raise _Stop

    monkeypatch.setattr(downstream, "autocast", autocast)
    monkeypatch.setenv("MEDGEN_CACHE_DIR", str(tmp_path / "env_cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    out = tmp_path / "out"
    with pytest.raises(_Stop):
        main(["--real", str(folders["real"]), "--out", str(out), "--synthetic", f"a={folders['s2d']}", "--seeds", "0",
              "--steps", "1", "--precision", "bf16"])
    assert seen == ["bf16"]
    assert any((tmp_path / "env_cache").rglob("*")) and not (tmp_path / "home").exists()
    assert not out.exists()  # nothing is written before the results are in


def test_the_budget_reaches_the_experiment_whole_with_fp32_by_default(folders, tmp_path, monkeypatch):
    import medgen.evaluation.augmentation as augmentation

    seen = {}

    def run_experiment(cfg, sets, out_dir, device, progress=True):
        seen.update(budget=dict(cfg.budget), cache_dir=cfg.cache_dir, seeds=list(cfg.seeds), sets=sets)
        raise _Stop

    monkeypatch.setattr(augmentation, "run_experiment", run_experiment)
    monkeypatch.setenv("MEDGEN_CACHE_DIR", str(tmp_path / "env_cache"))
    with pytest.raises(_Stop):
        main(["--real", str(folders["real"]), "--out", str(tmp_path / "out"), "--synthetic", f"a={folders['s2d']}",
              "--steps", "7"])
    assert seen == {"budget": {"steps": 7, "batch_size": 16, "learning_rate": 3e-3, "precision": "fp32"},
                    "cache_dir": str(tmp_path / "env_cache"), "seeds": [0, 1, 2], "sets": {"a": folders["s2d"]}}
    with pytest.raises(_Stop):  # --cache-dir still wins over the variable
        main(["--real", str(folders["real"]), "--out", str(tmp_path / "out"), "--synthetic", f"a={folders['s2d']}",
              "--cache-dir", str(tmp_path / "mine")])
    assert seen["cache_dir"] == str(tmp_path / "mine")


@pytest.mark.parametrize("text, expected", [("real=real", ("real", "real")),
                                             ("s=tiny:4,small:2", ("s", {"tiny": 4.0, "small": 2.0}))])
def test_targets_parse(text, expected):
    assert parse_target(text) == expected
