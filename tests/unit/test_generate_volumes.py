"""medgen-generate from volume models (model.image_size=[X, Y, Z]): volumes with the training geometry,
the gate on 3D lesions, pictures in three planes, nnU-Net 3D export, resume, real masks, refusals."""

from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import VOLUMES, tiny_overrides
from monai.transforms import LoadImage

from medgen.core.checkpoint import load_checkpoint
from medgen.core.distributed import DistInfo
from medgen.data.brain import brain_of, inside_fraction
from medgen.data.lesions import RANO_BM, feret_diameters, largest_diameter
from medgen.data.masks import lesion_labels
from medgen.data.nifti_dataset import load_volume
from medgen.data.space import SampleSpace
from medgen.data.validate import check_dataset
from medgen.diffusion.config import load_config
from medgen.generation import GenerationError, Stage, generate
from medgen.generation import gate as quality_gate
from medgen.generation.writer import render_sample

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = (16, 16, 8)
OPEN_GATE = {"enabled": False}


def _generate(tmp: Path, ckpts: dict[str, Path], **settings):
    base = {"seg_checkpoint": str(ckpts["seg"]), "image_checkpoint": str(ckpts["bravo"]), "out_dir": str(tmp / "out"),
            "num_images": 4, "batch_size": 2, "steps": 3, "precision": "fp32", "gate": OPEN_GATE,
            "cache_dir": str(tmp / "cache")}
    return generate(progress=False, **{**base, **settings})


def _manifest(out: Path) -> list[dict[str, str]]:
    with open(out / "manifest.csv") as f:
        return list(csv.DictReader(f))


def _volumes(out: Path) -> dict[str, dict[str, np.ndarray]]:
    return {p.name: {f.name: load_volume(f)[0] for f in sorted(p.glob("*.nii.gz"))}
            for p in sorted((out / "train").iterdir())}


def test_volumes_are_a_medgen_dataset_with_the_training_geometry(tmp_path, volume_checkpoints):
    result = _generate(tmp_path, volume_checkpoints, format="nnunet")
    out = result.out_dir
    assert result.status == "done" and result.sample_ids == [f"syn_{i:06d}" for i in range(4)]
    report = check_dataset(out, progress=False)
    assert report.ok and report.keys == ["bravo", "seg"] and report.patients_checked == 4
    # whole volumes [X, Y, Z], RAS, with the voxel size of the image model's training volumes
    spacing = load_checkpoint(volume_checkpoints["bravo"])["space"]["spacing"]
    assert len(spacing) == 3
    img = LoadImage(image_only=True)(str(out / "train" / "syn_000000" / "bravo.nii.gz"))
    assert tuple(img.shape) == SHAPE
    np.testing.assert_allclose(img.meta["pixdim"][1:4], spacing)
    np.testing.assert_allclose(np.asarray(img.affine), np.diag([*spacing, 1.0]), atol=1e-6)
    volumes = _volumes(out)
    rows = _manifest(out)
    assert [r["id"] for r in rows] == result.sample_ids
    for r in rows:
        seg, bravo = volumes[r["id"]]["seg.nii.gz"], volumes[r["id"]]["bravo.nii.gz"]
        assert set(np.unique(seg)) <= {0.0, 1.0} and 0 <= bravo.min() and bravo.max() <= 1
        # lesions are 3D components (26-connected), measured in mm along all three axes
        d = feret_diameters(seg, spacing)
        assert int(r["components"]) == lesion_labels(seg)[1] == len(d)
        assert r["lesion_diameters_mm"] == ";".join(f"{x:.1f}" for x in d)
        assert r["lesion_bins"] == ";".join(RANO_BM.name(x) for x in d)
        assert float(r["mask_area"]) == pytest.approx(seg.mean(), abs=1e-6)
        fraction = inside_fraction(seg, brain_of(bravo))  # the brain of each axial slice of its own image
        assert r["inside_brain"] == ("" if np.isnan(fraction) else f"{fraction:.4f}")
    assert sum(int(r["components"]) for r in rows) > 0
    # previews: per image key its three planes, then the same with the mask outlined
    from PIL import Image

    arrays = {"bravo": volumes["syn_000001"]["bravo.nii.gz"], "seg": volumes["syn_000001"]["seg.nii.gz"]}
    expected = render_sample(arrays, ["bravo"], SampleSpace(SHAPE, spacing))
    preview = np.asarray(Image.open(out / "previews" / "syn_000001.png").convert("RGB"))
    assert np.array_equal(preview, expected)
    assert Image.open(out / "contact_sheet.png").size[0] > expected.shape[1] // 2
    # nnU-Net v2: whole volumes, images and labels of one geometry
    root = out / "nnUNet_raw" / "Dataset501_MedgenSynthetic"
    dataset = json.loads((root / "dataset.json").read_text())
    assert dataset["numTraining"] == 4 and "volumes" in dataset["description"]
    label = LoadImage(image_only=True)(str(root / "labelsTr" / "syn_000002.nii.gz"))
    image = LoadImage(image_only=True)(str(root / "imagesTr" / "syn_000002_0000.nii.gz"))
    assert tuple(label.shape) == tuple(image.shape) == SHAPE
    np.testing.assert_allclose(np.asarray(label.affine), np.asarray(image.affine))


def test_the_gate_measures_3d_lesions(tmp_path, volume_checkpoints):
    # by hand: two blobs touching only at a corner across slices are one lesion (26-connected)
    mask = np.zeros((1, *SHAPE), np.uint8)
    mask[0, 2:4, 2:4, 1:3] = 1
    mask[0, 4, 4, 3] = 1  # touches (3, 3, 2) at a corner
    mask[0, 10:12, 10, 5] = 1  # a second lesion of 2 voxels
    stats = quality_gate.measure(mask)
    assert (int(stats.components[0]), int(stats.smallest[0])) == (2, 2)
    assert stats.area[0] == pytest.approx(11 / np.prod(SHAPE))
    # the block files keep each candidate's largest lesion in mm along the three axes
    _generate(tmp_path, volume_checkpoints, num_images=2, lesion_sizes={"target": "model"},
              lesion_counts={"target": "model"},
              gate={"enabled": True, "min_area": 0.0, "max_area": 1.0, "max_components": 10000,
                    "min_component_pixels": 1, "inside_brain": False})
    spacing = load_checkpoint(volume_checkpoints["bravo"])["space"]["spacing"]
    blocks = sorted((tmp_path / "out" / ".medgen" / "masks").glob("block_*.npz"))
    with np.load(blocks[0]) as block:
        assert block["masks"].shape[1:] == SHAPE
        for m, mm in zip(block["masks"], block["largest_mm"]):
            assert mm == pytest.approx(largest_diameter(m, spacing))
        assert np.array_equal(block["components"], [lesion_labels(m)[1] for m in block["masks"]])


def test_a_volume_speck_is_by_default_what_a_4_mm_ball_fills_and_no_area_minimum(tmp_path, volume_checkpoints, caplog):
    spacing = load_checkpoint(volume_checkpoints["bravo"])["space"]["spacing"]
    voxels = max(1, int(np.ceil(4 / 3 * np.pi * 2 ** 3 / np.prod(spacing) - 1e-9)))  # a ball 4 mm across
    assert voxels == 5  # 1.875 x 1.875 x 2 mm voxels: not the 4 pixels of a slice
    gate = {"enabled": True, "max_area": 1.0, "max_components": 10000, "inside_brain": False, "max_attempts": 8}
    with caplog.at_level("INFO", logger="medgen.generate"):
        try:
            _generate(tmp_path, volume_checkpoints, num_images=2, gate=gate, lesion_sizes={"target": "model"},
                      lesion_counts={"target": "model"})
        except GenerationError as exc:  # what a 3-step model draws may not pass: the message names the value
            assert f"min_component_pixels={voxels}" in str(exc)
    settings = json.loads((tmp_path / "out" / ".medgen" / "settings.json").read_text())
    assert settings["gate"]["min_component_pixels"] == voxels and settings["gate"]["min_area"] == 0.0
    assert f"fewer than {voxels} voxel(s)" in caplog.text
    for path in (tmp_path / "out" / ".medgen" / "masks").glob("block_*.npz"):
        with np.load(path) as block:
            has_lesion = block["components"] > 0
            assert np.array_equal(block["accepted"], has_lesion & (block["smallest"] >= voxels))


def test_an_interrupted_volume_run_continues_to_the_same_files(tmp_path, volume_checkpoints, monkeypatch):
    straight = _generate(tmp_path / "straight", volume_checkpoints, num_images=3, batch_size=1)
    real_sample = Stage.sample
    state = {"stop": True}

    def sample(self, cond, *args, **kwargs):
        x0 = real_sample(self, cond, *args, **kwargs)
        if cond is not None and state["stop"]:  # after the first painted volume
            state["stop"] = False
            os.kill(os.getpid(), signal.SIGTERM)
        return x0

    monkeypatch.setattr(Stage, "sample", sample)
    first = _generate(tmp_path / "resumed", volume_checkpoints, num_images=3, batch_size=1)
    assert first.status == "stopped" and len(list((first.out_dir / "train").iterdir())) == 1
    second = _generate(tmp_path / "resumed", volume_checkpoints, num_images=3, batch_size=1)
    assert second.status == "done"
    a, b = _volumes(straight.out_dir), _volumes(second.out_dir)
    assert a.keys() == b.keys() and len(a) == 3
    for sid in a:
        for key in a[sid]:
            assert np.array_equal(a[sid][key], b[sid][key]), (sid, key)
    assert _manifest(straight.out_dir) == _manifest(second.out_dir)


def test_real_volumes_as_masks(tmp_path, volume_checkpoints, tiny_data):
    from medgen.data.slices import open_or_build_cache
    from medgen.data.splits import split_patients
    from medgen.data.volumes import VolumeSpec

    result = _generate(tmp_path, volume_checkpoints, seg_checkpoint=None, masks_from=str(tiny_data),
                       masks_split="train", num_images=2, samples_per_mask=2)
    cache = open_or_build_cache(split_patients(tiny_data, "train"), VolumeSpec(("seg",), SHAPE),
                                tmp_path / "cache", desc="masks")
    first, second = [cache.patient_ids[i] for i in np.flatnonzero(cache.lesion_pixels > 0)[:2]]
    rows = _manifest(result.out_dir)
    assert [r["mask_source"] for r in rows] == [f"train/{first}"] * 2 + [f"train/{second}"] * 2
    assert [r["id"] for r in rows] == [f"{first}_s0", f"{first}_s1", f"{second}_s0", f"{second}_s1"]
    # each mask is the patient's own, resampled into the volume as the training volumes are
    written = load_volume(result.out_dir / "train" / f"{second}_s1" / "seg.nii.gz")[0]
    expected = cache.data[cache.patient_ids.index(second), 0].astype(np.float32)
    assert np.array_equal(written, expected) and written.sum() > 0
    # the per-voxel mean and std of the two draws, and their picture in three planes
    folder = result.out_dir / "uncertainty" / first
    draws = np.stack([load_volume(result.out_dir / "train" / f"{first}_s{d}" / "bravo.nii.gz")[0] for d in (0, 1)])
    np.testing.assert_allclose(load_volume(folder / "bravo_std.nii.gz")[0], draws.std(0), atol=1e-6)
    assert load_volume(folder / "bravo_mean.nii.gz")[0].shape == SHAPE and (folder / "uncertainty.png").is_file()


def test_slice_and_volume_models_do_not_pair(tmp_path, volume_checkpoints, tiny_checkpoints):
    with pytest.raises(GenerationError, match=r"seg_checkpoint .*seg.*latest.pt makes masks as 16x16x8 volumes but "
                                              r"image_checkpoint .*latest.pt paints 16 px slices"):
        _generate(tmp_path, {"seg": volume_checkpoints["seg"], "bravo": tiny_checkpoints["bravo"]})
    with pytest.raises(GenerationError, match=r"makes masks as 16 px slices but image_checkpoint .*latest.pt paints "
                                              r"16x16x8 volumes; train both with one model.image_size"):
        _generate(tmp_path, {"seg": tiny_checkpoints["seg"], "bravo": volume_checkpoints["bravo"]})


def test_generated_volumes_train_a_volume_model(tmp_path, volume_checkpoints):
    from medgen.diffusion.trainer import DiffusionTrainer

    out = _generate(tmp_path, volume_checkpoints).out_dir
    cfg = load_config([f"paths.data_dir={out}", f"paths.cache_dir={tmp_path / 'cache'}", "mode=bravo",
                       *tiny_overrides(tmp_path, out, *VOLUMES, "training.max_steps=2", "training.val_interval=100")])
    trainer = DiffusionTrainer(cfg, tmp_path / "run", DistInfo(device=torch.device("cpu")), progress=False)
    assert trainer.data.train_cache.data.shape[2:] == SHAPE
    assert trainer.train() in ("done", "max_steps") and trainer.step > 0
    assert (tmp_path / "run" / "checkpoints" / "latest.pt").is_file()


def test_volumes_painted_on_real_masks_are_evaluated_in_3d_against_their_own_patients(tmp_path, volume_checkpoints,
                                                                                        feature_net):
    """The chain a user runs: medgen-generate from a volume model on the masks of the real test
    volumes, then medgen-evaluate: 3D metrics, paired PSNR/SSIM per patient, three-plane report."""
    from datagen import write_dataset
    from medgen.evaluation.config import evaluate_config
    from medgen.evaluation.evaluate import evaluate

    real = tmp_path / "real"
    write_dataset(real, n_patients=6, shape=(32, 32, 8), splits=("train", "test"), keys=("bravo", "seg"))
    result = _generate(tmp_path, volume_checkpoints, seg_checkpoint=None, masks_from=str(real), masks_split="test",
                       num_images=None)
    rows = _manifest(result.out_dir)
    assert {r["mask_source"] for r in rows} <= {f"test/patient_{i:03d}" for i in (1, 3, 5)} and rows
    cfg = evaluate_config({
        "real_dir": str(real), "synthetic_dir": str(result.out_dir), "out_dir": str(tmp_path / "eval"),
        "cache_dir": str(tmp_path / "cache"), "seeds": [0], "num_workers": 0, "diversity_pairs": 4, "downstream": False,
        "budget": {"steps": 5, "batch_size": 2},  # the real-trained network of the adherence check
        "features": {"network": str(feature_net), "kid_subsets": 2, "kid_subset_size": 4, "slices_per_plane": 2}})
    r = evaluate(cfg, torch.device("cpu"), progress=False)
    assert (r["unit"], r["space"]["shape"]) == ("volume", list(SHAPE))
    assert r["distribution"]["items"]["synthetic"] == len(rows)
    # each synthetic volume paired with the real test volume whose mask it was painted on
    assert r["paired"]["bravo"]["pairs"] == len(rows) and np.isfinite(r["paired"]["bravo"]["psnr"])
    assert "fid_2.5d" in r["features"]["bravo"]
    assert (tmp_path / "eval" / "planes_synthetic.png").is_file() and (tmp_path / "eval" / "report.html").is_file()
