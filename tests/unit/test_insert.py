"""Insertion (insert.into): new lesions painted into real scans, exactly where and as large as asked,
the scan unchanged elsewhere; the manifest, a restart, and the refusals."""

from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from medgen.core.schema import ConfigError
from medgen.data.brain import brain_of
from medgen.data.lesions import feret_diameters, parse_bins
from medgen.data.masks import lesion_labels
from medgen.data.nifti_dataset import DataError, load_volume
from medgen.data.validate import check_dataset
from medgen.generation import GenerationError, Stage, generate
from medgen.generation.insert_place import grow
from medgen.generation.status import read_status

pytestmark = pytest.mark.usefixtures("one_thread")

SPACING_2D = None  # read from the written files


def _insert(tmp: Path, data: Path, checkpoint: Path | None, **settings):
    insert = {"into": str(data), "painter": "repaint", "keep_source": True, **settings.pop("insert", {})}
    base = {"out_dir": str(tmp / "out"), "num_images": 6, "batch_size": 4, "steps": 3, "precision": "fp32",
            "cache_dir": str(tmp / "cache"), "insert": insert}
    if checkpoint is not None:
        base["image_checkpoint"] = str(checkpoint)
    return generate(progress=False, **{**base, **settings})


def _samples(out: Path) -> dict[str, dict[str, np.ndarray]]:
    folders = sorted((out / "train").iterdir())
    return {p.name: {f.name.split(".")[0]: load_volume(f)[0] for f in p.glob("*.nii.gz")} for p in folders}


def _spacing(out: Path) -> tuple[float, ...]:
    first = next((out / "train").iterdir())
    affine = load_volume(first / "seg.nii.gz")[1]
    return tuple(float(v) for v in np.abs(np.diag(affine))[:3])


def _manifest(out: Path) -> list[dict[str, str]]:
    with open(out / "manifest.csv") as f:
        return list(csv.DictReader(f))


def _new_lesions(sample: dict[str, np.ndarray]) -> tuple[np.ndarray, int, np.ndarray]:
    """(labels of the output mask, count, bool per label: new, i.e. not a lesion of the source)."""
    labels, count = lesion_labels(sample["seg"])
    old = sample["source_seg"] > 0.5
    new = np.asarray([not (old & (labels == k)).any() for k in range(1, count + 1)])
    return labels, count, new


@pytest.mark.parametrize("painter", ["repaint", "copy"])
def test_new_lesions_lie_in_the_brain_apart_from_old_ones_and_nothing_else_changes(tmp_path, tiny_data,
                                                                                  tiny_checkpoints, painter):
    result = _insert(tmp_path, tiny_data, tiny_checkpoints["bravo"], insert={"painter": painter, "margin": 1},
                     lesion_counts={"target": {"1": 1, "2": 1}}, lesion_sizes={"target": "uniform", "bins": [4, 8]})
    assert result.status == "done"
    samples = _samples(result.out_dir)
    assert len(samples) == 6
    for name, s in samples.items():
        region = s["region"] > 0.5
        # outside the painted regions the output is the real scan, voxel for voxel
        assert np.array_equal(s["bravo"][~region], s["source_bravo"][~region]), name
        assert not np.array_equal(s["bravo"][region], s["source_bravo"][region]), name
        # the scan's own lesions stay labelled; every lesion of the output is wholly old or wholly new
        assert ((s["source_seg"] > 0.5) <= (s["seg"] > 0.5)).all()
        labels, count, new = _new_lesions(s)
        old = s["source_seg"] > 0.5
        for k in range(1, count + 1):
            assert (old[labels == k]).all() or not (old[labels == k]).any(), name
        # every new lesion lies in the brain of the real scan (derived independently) and in its region
        brain = brain_of(s["source_bravo"][..., 0], "heuristic", None)
        new_voxels = np.isin(labels, 1 + np.flatnonzero(new))[..., 0]
        assert new_voxels.any() and brain[new_voxels].all() and region[..., 0][new_voxels].all(), name
        # the region is the new lesions grown by insert.margin=1: their 8-neighbourhood
        assert np.array_equal(region[..., 0], grow(new_voxels, 1)), name
    report = check_dataset(result.out_dir, progress=False)  # a medgen dataset; its extra files are known ones
    assert report.ok and not report.problems, report
    rows = _manifest(result.out_dir)
    assert [r["id"] for r in rows] == sorted(samples)
    assert all(r["painter"] == painter and r["source"].startswith("train/patient_") and "/z" in r["source"]
               for r in rows)


def test_the_size_and_count_classes_equal_the_request_exactly(tmp_path, tiny_data, tiny_checkpoints):
    bins = [4, 8]
    result = _insert(tmp_path, tiny_data, None, num_images=8, insert={"painter": "copy", "image_size": 32},
                     lesion_counts={"target": {"1": 1, "2": 1}}, lesion_sizes={"target": {"<4mm": 1, "4-8mm": 2,
                                                                                          ">=8mm": 1}, "bins": bins})
    spacing = _spacing(result.out_dir)[:2]
    assert {s["bravo"].shape for s in _samples(result.out_dir).values()} == {(32, 32, 1)}  # insert.image_size=32
    sizes, counts = np.zeros(3, int), np.zeros(4, int)
    rows = {r["id"]: r for r in _manifest(result.out_dir)}
    for name, s in _samples(result.out_dir).items():
        labels, count, new = _new_lesions(s)
        diameters = feret_diameters(np.isin(labels, 1 + np.flatnonzero(new))[..., 0], spacing)
        classes = parse_bins(bins).index(diameters)
        np.add.at(sizes, classes, 1)
        counts[len(diameters) - 1] += 1
        # the manifest records each new lesion: its class and diameter as measured in the file, its centre in it
        row = rows[name]
        assert sorted(row["lesion_bins"].split(";")) == sorted(parse_bins(bins).names[c] for c in classes)
        assert sorted(float(d) for d in row["lesion_diameters_mm"].split(";")) == \
            pytest.approx(sorted(diameters), abs=0.051)
        for centre in row["lesion_centres"].split(";"):
            x, y = map(int, centre.split())
            assert labels[x - 2:x + 3, y - 2:y + 3].any()
        assert all(shape.startswith("real train/patient_") for shape in row["lesion_shapes"].split(";"))
        assert row["new_lesions"] == str(len(diameters)) and float(row["inside_brain"]) == 1.0
    # 8 scans: 4 with one lesion, 4 with two: 12 lesions, shared 1 : 2 : 1
    assert counts.tolist() == [4, 4, 0, 0] and sizes.tolist() == [3, 6, 3]
    report = json.loads((result.out_dir / "lesion_sizes.json").read_text())
    assert report["sizes"]["requested"] == report["sizes"]["painted"] == [3, 6, 3]
    assert (result.out_dir / "contact_sheet.png").stat().st_size > 1000


def test_a_stopped_insertion_continues_to_the_files_of_a_straight_run(tmp_path, tiny_data, tiny_checkpoints,
                                                                      monkeypatch):
    straight = _insert(tmp_path / "straight", tiny_data, tiny_checkpoints["bravo"], num_images=5, batch_size=2)
    real_sample = Stage.sample
    state = {"stop": True}

    def sample(self, *args, **kwargs):
        x0 = real_sample(self, *args, **kwargs)
        if state["stop"]:
            state["stop"] = False
            os.kill(os.getpid(), signal.SIGTERM)
        return x0

    monkeypatch.setattr(Stage, "sample", sample)
    first = _insert(tmp_path / "resumed", tiny_data, tiny_checkpoints["bravo"], num_images=5, batch_size=2)
    assert first.status == "stopped"
    status = read_status(first.out_dir)
    assert (status.complete, status.done, status.expected) == (False, 2, 5)
    assert [r["id"] for r in _manifest(first.out_dir)] == ["ins_000000", "ins_000001"]
    second = _insert(tmp_path / "resumed", tiny_data, tiny_checkpoints["bravo"], num_images=5, batch_size=2)
    assert second.status == "done" and read_status(second.out_dir).complete
    a, b = _samples(straight.out_dir), _samples(second.out_dir)
    assert a.keys() == b.keys()
    for name in a:
        for key in a[name]:
            np.testing.assert_allclose(a[name][key], b[name][key], rtol=0, atol=1e-5, err_msg=f"{name} {key}")
    assert _manifest(straight.out_dir) == _manifest(second.out_dir)


def test_volumes_take_new_lesions_the_same_way(tmp_path, tiny_data, volume_checkpoints):
    result = _insert(tmp_path, tiny_data, volume_checkpoints["bravo"], num_images=3, batch_size=2,
                     insert={"margin": 1}, lesion_sizes={"target": {"tiny": 1}})
    spacing = _spacing(result.out_dir)
    for name, s in _samples(result.out_dir).items():
        assert s["bravo"].shape == (16, 16, 8)
        region = s["region"] > 0.5
        assert np.array_equal(s["bravo"][~region], s["source_bravo"][~region])
        labels, count, new = _new_lesions(s)
        assert new.sum() == 1
        d = feret_diameters(np.isin(labels, 1 + np.flatnonzero(new)), spacing)
        assert d[0] < 10  # tiny
    assert all("/z" not in r["source"] for r in _manifest(result.out_dir))


def test_repaint_keeps_the_known_region_exactly(tiny_checkpoints):
    import torch

    from medgen.generation.models import load_stage

    stage = load_stage(tiny_checkpoints["bravo"], "image", "image_checkpoint", device=torch.device("cpu"),
                       precision="fp32")
    known = torch.rand(2, 1, 16, 16) * 2 - 1
    region = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    region[:, :, 4:9, 5:10] = True
    cond = torch.full((2, 2, 16, 16), -1.0)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    x0 = stage.sample(cond, gens, steps=4, sampler="euler", known=known, region=region)
    assert torch.equal(x0[~region], known[~region])
    assert not torch.allclose(x0[region], known[region])


def test_refusals_name_the_key_or_file(tmp_path, tiny_data, tiny_checkpoints, volume_checkpoints):
    bravo = tiny_checkpoints["bravo"]
    with pytest.raises(GenerationError, match="insert.painter=inpaint needs a mode=inpaint checkpoint"):
        _insert(tmp_path, tiny_data, bravo, insert={"painter": "inpaint"})
    with pytest.raises(GenerationError, match=r"insert.image_size=\[16, 16, 8\]: .* give 2 size"):
        _insert(tmp_path, tiny_data, bravo, insert={"image_size": [16, 16, 8]})
    with pytest.raises(ConfigError, match="image_checkpoint"):
        _insert(tmp_path, tiny_data, None)
    with pytest.raises(ConfigError, match="insert.image_size"):
        _insert(tmp_path, tiny_data, None, insert={"painter": "copy"})
    with pytest.raises(ConfigError, match="masks_from"):
        _insert(tmp_path, tiny_data, bravo, masks_from=str(tiny_data))
    with pytest.raises(GenerationError, match="lesion_sizes.target=model"):
        _insert(tmp_path, tiny_data, bravo, lesion_sizes={"target": "model"})
    with pytest.raises(DataError, match=r"insert.into=.*no patients in .*test"):
        _insert(tmp_path, tiny_data, bravo, insert={"split": "test"})
    with pytest.raises(GenerationError, match="fit in none of 20 scans"):
        _insert(tmp_path, tiny_data, bravo, lesion_counts={"target": {"4+": 1}}, lesion_sizes={"target": {"large": 1}})
    with pytest.raises(DataError, match=r"have no \['flair'\]"):
        _insert(tmp_path, tiny_data, None, insert={"painter": "copy", "image_size": 16, "modalities": ["flair"]})
    with pytest.raises(GenerationError, match=r"asks for <2mm lesions .* one voxel of the scans .* measures 2.8 mm"):
        _insert(tmp_path, tiny_data, bravo, lesion_sizes={"target": "uniform", "bins": [2, 8]})
    assert not (tmp_path / "out" / "train").exists()  # nothing half-written


@pytest.fixture(scope="module")
def inpaint_checkpoint(tmp_path_factory, tiny_data) -> Path:
    """An inpainting painter of 8 x 8 windows of 16 px slices, a few steps trained."""
    import torch

    from conftest import tiny_overrides
    from medgen.core.distributed import DistInfo
    from medgen.diffusion.config import load_config
    from medgen.diffusion.trainer import DiffusionTrainer

    tmp = tmp_path_factory.mktemp("inpaint")
    cfg = load_config(tiny_overrides(tmp, tiny_data, "mode=inpaint", "strategy=rflow", "training.max_steps=3",
                                     "mode.window=8"))
    DiffusionTrainer(cfg, tmp / "run", DistInfo(device=torch.device("cpu")), progress=False).train()
    return tmp / "run" / "checkpoints" / "latest.pt"


def test_an_inpaint_painter_paints_windows_into_larger_scans(tmp_path, tiny_data, inpaint_checkpoint, monkeypatch):
    from medgen.generation import insert_paint

    seen = []
    real = insert_paint.paint_windows

    def paint_windows(stage, painter, images, masks, brains, windows, *args):
        seen.extend((painter, tuple(b.stop - b.start for b in w.box), images[w.sample].shape) for w in windows)
        return real(stage, painter, images, masks, brains, windows, *args)

    monkeypatch.setattr("medgen.generation.insert.paint_windows", paint_windows)
    result = _insert(tmp_path, tiny_data, inpaint_checkpoint, insert={"painter": "inpaint", "margin": 1},
                     lesion_sizes={"target": "uniform", "bins": [4, 8]})
    assert seen and all(s == ("inpaint", (8, 8), (1, 16, 16)) for s in seen)  # 8 x 8 windows of 16 px scans
    for name, s in _samples(result.out_dir).items():
        region = s["region"] > 0.5
        assert np.array_equal(s["bravo"][~region], s["source_bravo"][~region]), name
        assert not np.array_equal(s["bravo"][region], s["source_bravo"][region]), name
    report = json.loads((result.out_dir / "lesion_sizes.json").read_text())
    assert report["painter"] == "inpaint" and report["seam"]["samples"] == 6 and report["seam"]["seam"] > 0
    with pytest.raises(GenerationError, match="insert.painter=repaint paints with a mask -> image model"):
        _insert(tmp_path / "b", tiny_data, inpaint_checkpoint, insert={"painter": "repaint"})
    with pytest.raises(GenerationError, match="is a mode=inpaint model: it paints lesions into real scans"):
        generate(progress=False, image_checkpoint=str(inpaint_checkpoint), masks_from=str(tiny_data),
                 out_dir=str(tmp_path / "c"), cache_dir=str(tmp_path / "cache"))


def test_shapes_drawn_by_a_seg_model(tmp_path, tiny_data, tiny_checkpoints):
    result = _insert(tmp_path, tiny_data, tiny_checkpoints["bravo"], seg_checkpoint=str(tiny_checkpoints["seg"]),
                     insert={"shapes": "seg", "margin": 1}, lesion_sizes={"target": "uniform", "bins": [4, 8]})
    shapes = [shape for r in _manifest(result.out_dir) for shape in r["lesion_shapes"].split(";")]
    assert len(shapes) == 6 and all(s.startswith("seg candidate ") and "#" in s for s in shapes)
    with pytest.raises(ConfigError, match="insert.shapes"):
        _insert(tmp_path / "b", tiny_data, tiny_checkpoints["bravo"], insert={"shapes": "seg"})


def test_the_brain_method_asked_derives_the_scans_brains(tmp_path, tiny_data, tiny_checkpoints, monkeypatch):
    import medgen.data.slices as slices

    specs = []

    def open_cache(patients, spec, *args, **kwargs):
        specs.append(spec)
        raise RuntimeError("the cache is not built in this test")

    monkeypatch.setattr(slices, "open_or_build_cache", open_cache)
    for method in ("deepbet", None):
        with pytest.raises(RuntimeError, match="not built"):
            _insert(tmp_path, tiny_data, tiny_checkpoints["bravo"], insert={"brain_method": method})
    # null: as the painter's training data derived it (heuristic for the test checkpoints)
    assert [s.brain_method for s in specs] == ["deepbet", "heuristic"] and specs[0].brain_from == "bravo"


def test_healthy_scans_take_lesions_from_another_dataset(tmp_path, tiny_data, tiny_checkpoints):
    """insert.shapes_from: the lesions of an annotated set copied into scans without any lesion."""
    import shutil

    from medgen.data.nifti_dataset import save_volume

    healthy = tmp_path / "healthy"
    shutil.copytree(tiny_data, healthy)
    for seg in healthy.glob("*/*/seg.nii.gz"):
        volume, affine = load_volume(seg)[:2]
        save_volume(seg, np.zeros_like(volume), affine, is_mask=True)
    with pytest.raises(DataError, match=r"insert.into=.*no lesion in train/ .* insert.shapes_from="):
        _insert(tmp_path / "a", healthy, tiny_checkpoints["bravo"], insert={"painter": "copy"})
    result = _insert(tmp_path / "b", healthy, tiny_checkpoints["bravo"], num_images=4,
                     insert={"painter": "copy", "shapes_from": str(tiny_data), "margin": 1},
                     lesion_counts={"target": "real"})  # real: the shares of the lesion counts of shapes_from
    for name, s in _samples(result.out_dir).items():
        assert not s["source_seg"].any() and lesion_labels(s["seg"])[1] == 1, name
        region = s["region"] > 0.5
        assert np.array_equal(s["bravo"][~region], s["source_bravo"][~region])
    rows = _manifest(result.out_dir)
    assert all(r["source"].startswith("train/patient_") and r["lesion_shapes"].startswith("real train/patient_")
               for r in rows)
    with pytest.raises(GenerationError, match="lesion_counts.target=real takes the shares .* has no lesion"):
        _insert(tmp_path / "c", healthy, tiny_checkpoints["bravo"], seg_checkpoint=str(tiny_checkpoints["seg"]),
                insert={"shapes": "seg"})


def test_a_train_split_whose_patients_all_go_to_validation_says_so(tmp_path, tiny_data, tiny_checkpoints):
    import shutil

    from medgen.data.splits import split_patients

    source = sorted((tiny_data / "train").iterdir())[0]
    for k in range(200):  # a name medgen's hash split sends to validation when it is train/'s only patient
        one = tmp_path / f"one_{k}"
        shutil.copytree(source, one / "train" / f"scan_{k}")
        if not split_patients(one, "train"):
            break
    else:
        pytest.fail("no name of 200 goes to validation")
    with pytest.raises(DataError, match=r"the 1 patient\(s\) of .*train all go to validation .* insert.split=test"):
        _insert(tmp_path, one, tiny_checkpoints["bravo"])


def test_a_restart_with_other_insertion_settings_is_refused_and_an_equal_one_is_not(tmp_path, tiny_data,
                                                                                  tiny_checkpoints):
    counts = {"lesion_counts": {"target": {1: 1}}}  # an int key: settings.json records it as "1"
    _insert(tmp_path, tiny_data, tiny_checkpoints["bravo"], num_images=2, insert={"margin": 1}, **counts)
    again = _insert(tmp_path, tiny_data, tiny_checkpoints["bravo"], num_images=2, insert={"margin": 1}, **counts)
    assert again.status == "done"
    with pytest.raises(GenerationError, match=r"other settings \(insert: .*'margin': 1.* -> .*'margin': 2"):
        _insert(tmp_path, tiny_data, tiny_checkpoints["bravo"], num_images=2, insert={"margin": 2}, **counts)
