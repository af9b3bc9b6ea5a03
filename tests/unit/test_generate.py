"""medgen-generate: the two-stage pipeline, its output as a dataset, determinism, resume, errors."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import LoadImage

from medgen.core.checkpoint import CheckpointError, load_checkpoint
from medgen.data.nifti_dataset import load_volume
from medgen.data.validate import check_dataset
from medgen.generation import GenerationError, Stage, generate
from medgen.generation.status import read_status

pytestmark = pytest.mark.usefixtures("one_thread")
OPEN_GATE = {"enabled": False}


def _generate(tmp: Path, ckpts: dict[str, Path], **settings):
    base = {"seg_checkpoint": str(ckpts["seg"]), "image_checkpoint": str(ckpts["bravo"]), "out_dir": str(tmp / "out"),
            "num_images": 6, "batch_size": 4, "steps": 4, "precision": "fp32", "gate": OPEN_GATE,
            "cache_dir": str(tmp / "cache")}
    return generate(progress=False, **{**base, **settings})


def _arrays(out: Path, split: str = "train") -> dict[str, dict[str, np.ndarray]]:
    return {p.name: {f.name: load_volume(f)[0] for f in sorted(p.glob("*.nii.gz"))}
            for p in sorted((out / split).iterdir())}


def _manifest(out: Path) -> list[dict[str, str]]:
    with open(out / "manifest.csv") as f:
        return list(csv.DictReader(f))


def test_output_is_a_medgen_dataset_with_the_training_geometry(tmp_path, tiny_checkpoints):
    result = _generate(tmp_path, tiny_checkpoints)
    out = result.out_dir
    assert result.status == "done" and result.sample_ids == [f"syn_{i:06d}" for i in range(6)]
    assert sorted(p.name for p in (out / "train").iterdir()) == result.sample_ids
    report = check_dataset(out, progress=False)
    assert report.ok and report.keys == ["bravo", "seg"] and report.patients_checked == 6
    # 2D slices as [S, S, 1] NIfTI with the voxel size of the training data's model slices
    spacing = load_checkpoint(tiny_checkpoints["bravo"])["space"]["spacing"]
    assert spacing == [2.0, 2.0, 2.0]  # tiny data: 1 x 1 x 2 mm at 32 px, resized to 16 px
    img = LoadImage(image_only=True)(str(out / "train" / "syn_000000" / "bravo.nii.gz"))
    assert tuple(img.shape) == (16, 16, 1)
    np.testing.assert_allclose(img.meta["pixdim"][1:4], spacing)
    arrays = _arrays(out)["syn_000000"]
    assert set(np.unique(arrays["seg.nii.gz"])) <= {0.0, 1.0}
    assert 0 <= arrays["bravo.nii.gz"].min() and arrays["bravo.nii.gz"].max() <= 1
    # pictures and the manifest
    assert (out / "contact_sheet.png").is_file() and len(list((out / "previews").glob("*.png"))) == 6
    rows = _manifest(out)
    assert [r["id"] for r in rows] == result.sample_ids
    assert {r["image_sampler"] for r in rows} == {"euler"} and {r["seg_sampler"] for r in rows} == {"dpmpp_2m"}
    assert rows[0]["image_sha256"] == __import__("hashlib").sha256(tiny_checkpoints["bravo"].read_bytes()).hexdigest()
    assert len({r["image_seed"] for r in rows}) == 6 and all(r["accepted"] == "True" for r in rows)
    # each lesion's Feret diameter and size class, as measured on the written mask with its own voxel size
    from medgen.data.lesions import RANO_BM, feret_diameters

    for r in rows:
        seg = LoadImage(image_only=True)(str(out / "train" / r["id"] / "seg.nii.gz"))
        d = feret_diameters(np.asarray(seg)[..., 0], seg.meta["pixdim"][1:3])
        assert r["lesion_diameters_mm"] == ";".join(f"{x:.1f}" for x in d) and len(d) == int(r["components"])
        assert r["lesion_bins"] == ";".join(RANO_BM.name(x) for x in d)
    assert sum(int(r["components"]) for r in rows) > 0  # the untrained tiny model's noise masks do have lesions
    # where its lesion pixels lie: inside the brain derived from its own written bravo, or "" without lesion
    from medgen.data.brain import brain_mask, inside_fraction

    for r in rows:
        arrays = _arrays(out)[r["id"]]
        fraction = inside_fraction(arrays["seg.nii.gz"][..., 0], brain_mask(arrays["bravo.nii.gz"][..., 0]))
        assert r["inside_brain"] == ("" if np.isnan(fraction) else f"{fraction:.4f}")


def test_the_gate_refuses_lesions_outside_the_brain_and_the_images_are_given_that_brain(tmp_path, tiny_checkpoints,
                                                                                       monkeypatch):
    """A stand-in seg model draws one lesion per candidate and, for odd candidates, a brain that misses
    a corner of it: only even candidates pass, and the image model is given each accepted brain."""
    real_sample = Stage.sample
    seen = []

    def sample(self, cond, generators, **kwargs):
        if cond is not None:
            seen.append(cond.clone())
            return real_sample(self, cond, generators, **kwargs)
        n, size = len(generators), self.space.size
        x0 = -torch.ones(n, 2, size, size)  # [seg, brain] in model space
        x0[:, 0, 6:10, 6:10] = 1  # a 4 x 4 lesion
        x0[:, 1, 2:14, 2:14] = 1  # inside a brain
        for b in range(n):  # candidates are drawn in order, so their number is their position overall
            if (len(seen_masks) + b) % 2:
                x0[b, 1, 6:8, 6:8] = -1  # a hole: 4 lesion pixels outside the brain
        seen_masks.extend(range(n))
        return x0

    seen_masks: list[int] = []
    monkeypatch.setattr(Stage, "sample", sample)
    gate = {"enabled": True, "max_area": 1.0, "inside_brain": True}
    result = _generate(tmp_path, tiny_checkpoints, num_images=3, batch_size=2, gate=gate, lesion_sizes={"target": "model"},
                       lesion_counts={"target": "model"})
    # the null rules of a slice model, as recorded: a lesion area of 0.0005 of the slice, specks under 4 pixels
    recorded = json.loads((tmp_path / "out" / ".medgen" / "settings.json").read_text())["gate"]
    assert (recorded["min_area"], recorded["min_component_pixels"]) == (0.0005, 4)
    rows = _manifest(result.out_dir)
    accepted = [int(r["mask_source"].split()[-1]) for r in rows if r["accepted"] == "True"]
    rejected = [int(r["mask_source"].split()[-1]) for r in rows if r["accepted"] == "False"]
    assert accepted == [0, 2, 4] and rejected == [1, 3] and result.acceptance_rate == pytest.approx(3 / 5)
    cond = torch.cat(seen)  # what the bravo model was given: [mask, brain] in model space
    assert cond.shape[1:] == (2, 16, 16)
    assert torch.all(cond[:, 1, 2:14, 2:14] == 1) and torch.all(cond[:, 0, 6:10, 6:10] == 1)
    # an image model that needs the brain cannot be paired with a seg model that does not draw it
    ckpt = load_checkpoint(tiny_checkpoints["seg"])
    ckpt["config"]["mode"]["image_keys"] = ["seg"]
    blind = tmp_path / "blind_seg.pt"
    torch.save(ckpt, blind)
    monkeypatch.setattr(Stage, "sample", real_sample)
    with pytest.raises(GenerationError, match=r"given the lesion mask and the brain .* generates \['seg'\] only"):
        _generate(tmp_path / "b", tiny_checkpoints, seg_checkpoint=str(blind))


def test_samples_do_not_depend_on_the_batch_size(tmp_path, tiny_checkpoints):
    one = _generate(tmp_path / "b1", tiny_checkpoints, batch_size=1, num_images=5)
    four = _generate(tmp_path / "b4", tiny_checkpoints, batch_size=4, num_images=5)
    a, b = _arrays(one.out_dir), _arrays(four.out_dir)
    assert a.keys() == b.keys()
    for sid in a:
        assert np.array_equal(a[sid]["seg.nii.gz"], b[sid]["seg.nii.gz"]), sid
        np.testing.assert_allclose(a[sid]["bravo.nii.gz"], b[sid]["bravo.nii.gz"], rtol=0, atol=1e-5)


def test_interrupted_run_continues_to_the_same_files(tmp_path, tiny_checkpoints, monkeypatch):
    straight = _generate(tmp_path / "straight", tiny_checkpoints, num_images=7, batch_size=2)
    # SIGTERM (as SLURM sends it before a job's end) after the first batch of stage 1 in the first
    # run, and of stage 2 in the second run
    real_sample = Stage.sample
    state = {"stop_in": "masks"}

    def sample(self, cond, *args, **kwargs):
        x0 = real_sample(self, cond, *args, **kwargs)
        if state["stop_in"] == ("masks" if cond is None else "images"):  # the seg model samples without a condition
            state["stop_in"] = "never"
            os.kill(os.getpid(), signal.SIGTERM)
        return x0

    monkeypatch.setattr(Stage, "sample", sample)
    first = _generate(tmp_path / "resumed", tiny_checkpoints, num_images=7, batch_size=2)
    assert first.status == "stopped" and not (first.out_dir / "train").exists()  # stopped in stage 1
    status = read_status(first.out_dir)  # expected from the settings (num_images): no mask is known yet
    assert _manifest(first.out_dir) == [] and (status.complete, status.done, status.expected) == (False, 0, 7)
    state["stop_in"] = "images"
    second = _generate(tmp_path / "resumed", tiny_checkpoints, num_images=7, batch_size=2)
    painted = sorted(p.name for p in (second.out_dir / "train").iterdir())
    assert second.status == "stopped" and len(painted) == 2  # one batch painted
    # the manifest lists the samples done so far, each as the finished run lists it; the status says unfinished
    assert [r["id"] for r in _manifest(second.out_dir)] == painted
    assert _manifest(second.out_dir) == [r for r in _manifest(straight.out_dir) if r["id"] in painted]
    status = read_status(second.out_dir)
    assert (status.complete, status.done, status.expected) == (False, 2, 7)
    third = _generate(tmp_path / "resumed", tiny_checkpoints, num_images=7, batch_size=2)
    assert third.status == "done"
    status = read_status(third.out_dir)
    assert (status.complete, status.done, status.expected) == (True, 7, 7)
    a, b = _arrays(straight.out_dir), _arrays(third.out_dir)
    assert a.keys() == b.keys()
    for sid in a:
        for key in a[sid]:
            assert np.array_equal(a[sid][key], b[sid][key]), (sid, key)
    assert _manifest(straight.out_dir) == _manifest(third.out_dir)


def test_a_restart_with_other_settings_is_refused(tmp_path, tiny_checkpoints):
    _generate(tmp_path, tiny_checkpoints, num_images=2)
    with pytest.raises(GenerationError, match=r"other settings \(seed: 0 -> 1\)"):
        _generate(tmp_path, tiny_checkpoints, num_images=2, seed=1)
    _generate(tmp_path, tiny_checkpoints, num_images=3)  # more of the same is fine


def test_gate_keeps_the_first_passing_candidates_whatever_the_batch(tmp_path, tiny_checkpoints):
    gate = {"enabled": True, "min_area": 0.0, "max_area": 1.0, "max_components": 1000, "min_component_pixels": 1,
            "inside_brain": False}  # an untrained seg model draws no brain around its lesions
    sizes = {"target": "model"}  # the area window alone decides
    probe = _generate(tmp_path / "probe", tiny_checkpoints, num_images=12, gate=OPEN_GATE)
    area = [float(r["mask_area"]) for r in _manifest(probe.out_dir)]  # candidates 0..11, in order
    others = sorted(area[1:])
    if area[0] > others[3]:  # an area window that rejects candidate 0 and passes at least 4 others
        gate["max_area"] = (others[3] + area[0]) / 2
    else:
        gate["min_area"] = (others[-4] + area[0]) / 2
    results = [_generate(tmp_path / f"b{b}", tiny_checkpoints, num_images=4, batch_size=b, gate=gate,
                         lesion_sizes=sizes, lesion_counts=sizes) for b in (1, 3)]
    rows = [_manifest(r.out_dir) for r in results]
    assert rows[0] == rows[1]
    accepted = [r for r in rows[0] if r["accepted"] == "True"]
    rejected = [r for r in rows[0] if r["accepted"] == "False"]
    assert len(accepted) == 4 and rejected and all(r["id"] == "" for r in rejected)
    inside = lambda r: gate["min_area"] <= float(r["mask_area"]) <= gate["max_area"]  # noqa: E731
    assert all(inside(r) for r in accepted) and not any(inside(r) for r in rejected)
    assert rows[0][0]["accepted"] == "True" and rows[0][0]["id"] == "syn_000000"  # accepted rows come first
    candidates = [int(r["mask_source"].split()[-1]) for r in accepted + rejected]
    assert sorted(candidates) == list(range(max(candidates) + 1))  # every candidate up to the 4th pass
    assert 0 < results[0].acceptance_rate < 1


def test_an_impossible_gate_stops_with_the_acceptance_rate(tmp_path, tiny_checkpoints):
    gate = {"enabled": True, "min_area": 0.9, "max_area": 1.0, "max_attempts": 8}
    with pytest.raises(GenerationError, match=r"accepted 0 of 8 generated masks \(0\.0%\).*gate\.max_attempts=8") as info:
        _generate(tmp_path, tiny_checkpoints, num_images=3, gate=gate, lesion_sizes={"target": "model"},
                  lesion_counts={"target": "model"})
    # why: each of the 8 broke exactly one of two rules (a lesion can never cover 90% of a slice)
    broken = dict((k, int(n)) for k, n in re.findall(r"(no lesion|lesion area < gate\.min_area=0\.9) (\d+)", str(info.value)))
    assert "masks breaking each rule (one mask may break several): " in str(info.value) and sum(broken.values()) == 8, str(info.value)


def test_masks_from_a_dataset_and_several_samples_per_mask(tmp_path, tiny_checkpoints, tiny_data):
    result = _generate(tmp_path, tiny_checkpoints, seg_checkpoint=None, masks_from=str(tiny_data), masks_split="train",
                       num_images=3, samples_per_mask=2)
    out = result.out_dir
    rows = _manifest(out)
    assert len(rows) == 6 and rows[0]["mask_source"].startswith("train/patient_")
    assert rows[0]["id"].endswith("_s0") and rows[1]["id"].endswith("_s1")
    a = _arrays(out)
    s0, s1 = a[rows[0]["id"]], a[rows[1]["id"]]
    assert np.array_equal(s0["seg.nii.gz"], s1["seg.nii.gz"]) and not np.array_equal(s0["bravo.nii.gz"], s1["bravo.nii.gz"])
    # the uncertainty map is the per-pixel mean and std of the two draws
    folder = out / "uncertainty" / rows[0]["id"][:-3]
    both = np.stack([s0["bravo.nii.gz"], s1["bravo.nii.gz"]])
    np.testing.assert_allclose(load_volume(folder / "bravo_mean.nii.gz")[0], both.mean(0), atol=1e-6)
    np.testing.assert_allclose(load_volume(folder / "bravo_std.nii.gz")[0], both.std(0), atol=1e-6)
    assert (folder / "uncertainty.png").is_file()
    # the conditioning masks are the real ones
    patient, z = rows[0]["mask_source"].split("/")[1:]
    real = load_volume(tiny_data / "train" / patient / "seg.nii.gz")[0]
    assert real[..., int(z[1:])].sum() > 0


def test_nnunet_export_and_dual_images(tmp_path, tiny_checkpoints):
    result = _generate(tmp_path, tiny_checkpoints, image_checkpoint=str(tiny_checkpoints["dual"]), num_images=3,
                       format="nnunet")
    root = result.out_dir / "nnUNet_raw" / "Dataset501_MedgenSynthetic"
    dataset = json.loads((root / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "t1_pre", "1": "t1_gd"} and dataset["labels"] == {"background": 0, "lesion": 1}
    assert dataset["numTraining"] == 3 and dataset["file_ending"] == ".nii.gz"
    images = sorted(p.name for p in (root / "imagesTr").iterdir())
    assert images == [f"syn_{i:06d}_{c:04d}.nii.gz" for i in range(3) for c in range(2)]
    assert sorted(p.name for p in (root / "labelsTr").iterdir()) == [f"syn_{i:06d}.nii.gz" for i in range(3)]
    for c, key in dataset["channel_names"].items():  # channel c is the modality the json names
        assert np.array_equal(load_volume(root / "imagesTr" / f"syn_000001_{int(c):04d}.nii.gz")[0],
                              load_volume(result.out_dir / "train" / "syn_000001" / f"{key}.nii.gz")[0])


def test_guidance_needs_a_model_trained_with_condition_dropout(tmp_path, tiny_checkpoints):
    with pytest.raises(GenerationError, match=r"guidance_scale=2 needs .*training.cond_dropout=0"):
        _generate(tmp_path / "a", tiny_checkpoints, image_checkpoint=str(tiny_checkpoints["dual"]), guidance_scale=2)
    guided = _generate(tmp_path / "b", tiny_checkpoints, guidance_scale=2.0, num_images=2)  # bravo: dropout 0.2
    plain = _generate(tmp_path / "c", tiny_checkpoints, guidance_scale=1.0, num_images=2)
    assert not np.array_equal(_arrays(guided.out_dir)["syn_000000"]["bravo.nii.gz"],
                              _arrays(plain.out_dir)["syn_000000"]["bravo.nii.gz"])


def test_wrong_stage_missing_and_newer_checkpoints_name_the_file(tmp_path, tiny_checkpoints):
    with pytest.raises(GenerationError, match=rf"image_checkpoint={tiny_checkpoints['seg']} is a 'seg' checkpoint "
                                              r"\(it generates \['seg', 'brain'\] from noise\); the image stage needs a "
                                              r"model that generates images given the mask"):
        _generate(tmp_path, tiny_checkpoints, image_checkpoint=str(tiny_checkpoints["seg"]))
    with pytest.raises(GenerationError, match=r"seg_checkpoint=.*is a 'bravo' checkpoint \(it generates \['bravo'\] "
                                              r"given \['seg', 'brain'\]\); the seg stage needs a model that generates "
                                              r"the mask"):
        _generate(tmp_path, tiny_checkpoints, seg_checkpoint=str(tiny_checkpoints["bravo"]))
    with pytest.raises(GenerationError, match=r"seg_checkpoint=nope.pt: .*nope.pt does not exist"):
        _generate(tmp_path, tiny_checkpoints, seg_checkpoint="nope.pt")
    data = torch.load(tiny_checkpoints["seg"], weights_only=False)
    data["format_version"] = 99
    torch.save(data, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match=r"future.pt has checkpoint format 99, newer than this medgen"):
        _generate(tmp_path, tiny_checkpoints, seg_checkpoint=str(tmp_path / "future.pt"))
    data = torch.load(tiny_checkpoints["seg"], weights_only=False)
    data["config"]["model"]["image_size"] = [16, 16, 8]
    data["space"] = {**data["space"], "shape": [16, 16, 8]}
    torch.save(data, tmp_path / "volumes.pt")
    with pytest.raises(GenerationError, match=r"seg_checkpoint .*volumes.pt makes masks as 16x16x8 volumes but "
                                              r"image_checkpoint .*latest.pt paints 16 px slices; train both with one "
                                              r"model.image_size"):
        _generate(tmp_path, tiny_checkpoints, seg_checkpoint=str(tmp_path / "volumes.pt"))
    # a checkpoint without what generation needs: one line naming the file, no fallback
    data = torch.load(tiny_checkpoints["seg"], weights_only=False)
    del data["lesion_sizes"]
    torch.save(data, tmp_path / "no_sizes.pt")
    with pytest.raises(GenerationError, match=r"seg_checkpoint=.*no_sizes.pt records no training lesion sizes"):
        _generate(tmp_path, tiny_checkpoints, seg_checkpoint=str(tmp_path / "no_sizes.pt"))
    data = torch.load(tiny_checkpoints["bravo"], weights_only=False)
    data["space"]["spacing"] = None
    torch.save(data, tmp_path / "no_spacing.pt")
    with pytest.raises(GenerationError, match=r"image_checkpoint=.*no_spacing.pt records no sample space with its "
                                              r"voxel spacing"):
        _generate(tmp_path, tiny_checkpoints, image_checkpoint=str(tmp_path / "no_spacing.pt"))


def test_a_generated_set_trains_with_medgen_train(tmp_path, tiny_checkpoints):
    from medgen.core.distributed import DistInfo
    from medgen.diffusion.config import load_config
    from medgen.diffusion.trainer import DiffusionTrainer

    out = _generate(tmp_path, tiny_checkpoints, num_images=8).out_dir
    cfg = load_config([f"paths.data_dir={out}", f"paths.cache_dir={tmp_path / 'cache'}", "mode=bravo",
                       "training=fast_debug", "training.precision=fp32", "training.batch_size=2", "training.max_steps=2",
                       "data.num_workers=0", "model.image_size=16", "model.channels=[32,32]",
                       "model.attention_levels=[false,true]", "model.num_head_channels=32"])
    trainer = DiffusionTrainer(cfg, tmp_path / "run", DistInfo(device=torch.device("cpu")), progress=False)
    assert len(trainer.data.train_cache) + len(trainer.data.val_cache) == 8  # every sample is one slice
    assert trainer.train() == "max_steps"
    assert trainer.data.train_cache.spacing == [2.0, 2.0, 2.0]  # the voxel size survives the round trip


def test_a_second_generation_into_the_same_out_dir_is_refused(tmp_path, tiny_checkpoints):
    from medgen.core.fs import FolderBusy, FolderLock

    out = tmp_path / "out"
    with FolderLock(out, "generation folder", ".medgen/lock"):  # another medgen-generate is writing there
        with pytest.raises(FolderBusy, match=f"generation folder {out} is in use by process {os.getpid()}"):
            _generate(tmp_path, tiny_checkpoints)
    assert not (out / "train").exists()


def test_the_status_of_an_older_or_foreign_folder(tmp_path):
    (tmp_path / "plain").mkdir()
    assert read_status(tmp_path / "plain") is None  # not a medgen-generate folder: nothing to refuse
    old = tmp_path / "old"
    (old / ".medgen").mkdir(parents=True)
    (old / ".medgen" / "settings.json").write_text(json.dumps({"num_images": 5, "samples_per_mask": 2}))
    status = read_status(old)  # written by a medgen without status.json, before its manifest: unfinished
    assert (status.complete, status.expected) == (False, 10)
    (old / "manifest.csv").write_text("id\n")  # those runs wrote the manifest last
    assert read_status(old).complete
    (old / ".medgen" / "status.json").write_text("{not json")  # torn: treated as unfinished
    assert not read_status(old).complete


def test_an_out_dir_that_cannot_be_a_folder_is_one_line(tmp_path):
    from omegaconf import OmegaConf

    from medgen.core.fs import FileSystemError, os_error_line
    from medgen.scripts._cli import output_folder

    (tmp_path / "a_file").write_text("x")
    with pytest.raises(FileSystemError) as caught:
        output_folder(OmegaConf.create({"out_dir": str(tmp_path / "a_file")}))
    assert os_error_line(caught.value) == (f"{tmp_path / 'a_file'}: out_dir must be a folder, and this is a file "
                                           "(choose another out_dir, or move the file away)")
    with pytest.raises(FileSystemError, match="cannot write to out_dir"):
        output_folder(OmegaConf.create({"out_dir": str(tmp_path / "a_file" / "below")}))
    folder = output_folder(OmegaConf.create({"out_dir": str(tmp_path / "new" / "out"), "seed": 3}))
    assert OmegaConf.load(folder / ".medgen" / "hydra" / "config.yaml").seed == 3


def test_the_mask_source_column_reads_back():
    from medgen.generation.records import CandidateSource, ItemSource, parse_mask_source

    for source in (CandidateSource(7), ItemSource("test", "patient_003", 41), ItemSource("test", "patient_003")):
        assert parse_mask_source(source.format()) == source
    assert ItemSource("test", "patient_003", 4).format() == "test/patient_003/z4"
    assert ItemSource("test", "patient_003", 4).sample_name == "patient_003_z004"
    assert (ItemSource("test", "patient_003").format(), ItemSource("test", "patient_003").sample_name) == \
        ("test/patient_003", "patient_003")
    assert [parse_mask_source(t) for t in ("", "candidate x", "test/patient_003/4", "a/b/zc")] == [None] * 4


def test_a_restart_removes_what_a_dead_run_left_half_written_only(tmp_path, tiny_checkpoints):
    from medgen.core.fs import HOST

    out = _generate(tmp_path, tiny_checkpoints, num_images=2).out_dir
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = out / "train" / f".syn_000009.tmp-{HOST}-{gone.pid}-0a0b0c"  # a sample folder a killed run left
    (dead / "seg.nii.gz").parent.mkdir()
    (dead / "seg.nii.gz").write_bytes(b"half")
    live = out / f".manifest.csv.tmp-{HOST}-{os.getpid()}-0a0b0c"  # its owner still runs: not ours to remove
    live.write_text("id\n")
    assert _generate(tmp_path, tiny_checkpoints, num_images=2).status == "done"
    assert not dead.exists() and live.exists()


@pytest.fixture
def flair_mode():
    """A mode registered by its class and decorator alone: flair painted given the mask."""
    from medgen.diffusion.modes import MODES, ConditionalSingleMode, register_mode

    @register_mode
    class FlairGivenMask(ConditionalSingleMode):
        name = "flair_given_mask"

    yield FlairGivenMask
    MODES.pop(FlairGivenMask.name, None)


def test_a_new_mode_trains_and_paints_the_images_of_a_generation(tmp_path, tiny_checkpoints, flair_mode, monkeypatch):
    from conftest import tiny_overrides
    from datagen import write_dataset

    from medgen.diffusion.config import load_config
    from medgen.core.distributed import DistInfo
    from medgen.diffusion.trainer import DiffusionTrainer

    data = tmp_path / "data"
    write_dataset(data, n_patients=4, shape=(32, 32, 8), keys=("flair", "seg"))
    cfg = load_config(tiny_overrides(tmp_path, data, "mode=bravo", f"mode.name={flair_mode.name}",
                                     "mode.image_keys=[flair]", "data.brain_from=flair", "strategy=rflow",
                                     "training.max_steps=3"))
    trainer = DiffusionTrainer(cfg, tmp_path / "run", DistInfo(device=torch.device("cpu")), progress=False)
    cache = trainer.data.train_cache  # the slice selection its class declares: brain slices, lesion or not
    assert cache.keys == ("flair", "seg", "brain") and (cache.lesion_pixels == 0).any() and 0 not in cache.slice_index
    assert trainer.train() == "max_steps"
    checkpoint = tmp_path / "run" / "checkpoints" / "latest.pt"
    result = _generate(tmp_path, tiny_checkpoints, image_checkpoint=str(checkpoint), num_images=3)
    assert result.status == "done" and len(result.sample_ids) == 3
    report = check_dataset(result.out_dir, progress=False)
    assert report.ok and report.keys == ["flair", "seg"] and report.patients_checked == 3
    arrays = _arrays(result.out_dir)["syn_000000"]
    assert 0 <= arrays["flair.nii.gz"].min() and arrays["flair.nii.gz"].max() <= 1
    # it paints images; it cannot make the masks
    with pytest.raises(GenerationError, match=rf"seg_checkpoint={checkpoint} is a 'flair_given_mask' checkpoint "
                                              r"\(it generates \['flair'\] given \['seg', 'brain'\]\); the seg stage needs a "
                                              r"model that generates the mask \('seg' in mode.image_keys\)"):
        _generate(tmp_path / "b", tiny_checkpoints, seg_checkpoint=str(checkpoint), image_checkpoint=str(checkpoint))
    # a process that does not register the mode cannot rebuild it, and says so
    from medgen.diffusion.modes import MODES

    monkeypatch.delitem(MODES, flair_mode.name)
    with pytest.raises(GenerationError, match=r"is a 'flair_given_mask' checkpoint, a mode this medgen does not know"):
        _generate(tmp_path / "c", tiny_checkpoints, image_checkpoint=str(checkpoint))
