"""medgen-evaluate on a 3D synthetic set: volume metrics by hand, 3D lesion matching, 2.5D slices,
the whole evaluation on tiny volumes (metrics.json, the report's three-plane sheets), refusals."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from datagen import make_patient, write_dataset
from PIL import Image

from medgen.data.lesions import SizeBins
from medgen.data.nifti_dataset import load_volume, modality_path, save_volume
from medgen.data.pictures import contact_sheet, render_planes
from medgen.data.slices import open_or_build_cache
from medgen.data.splits import split_patients
from medgen.data.volumes import VolumeSpec
from medgen.data.space import SampleSpace
from medgen.evaluation import EvaluationError, metrics
from medgen.evaluation.config import evaluate_config
from medgen.evaluation.downstream import build_segmenter, load_segmenter, save_segmenter
from medgen.evaluation.evaluate import evaluate
from medgen.evaluation.lesionwise import LesionTest, match_lesions
from medgen.evaluation.volumetric import plane_positions, plane_slices

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = (32, 32, 16)


# ============================================================================ by hand
def _two_lesion_volumes() -> np.ndarray:
    m = np.zeros((3, 20, 20, 10), np.uint8)
    m[0, 2:4, 2:5, 2:6] = 1  # a 2 x 3 x 4 box: 24 voxels
    m[0, 12, 12, 8] = 1  # one voxel, apart from it
    m[1, 5, 5, 5] = m[1, 6, 6, 6] = 1  # two voxels touching at a corner: one lesion in 3D
    return m  # volume 2 empty


def test_volume_mask_statistics_by_hand():
    spacing = (1.0, 1.0, 2.5)
    s = metrics.mask_statistics(_two_lesion_volumes(), SampleSpace((20, 20, 10), spacing))
    assert set(s) == {"lesions", "volume_fraction", "largest_diameter_mm", "lesion_volume_mm3"}
    np.testing.assert_array_equal(s["lesions"], [2, 1, 0])
    np.testing.assert_allclose(s["volume_fraction"], [25 / 4000, 2 / 4000, 0])
    # Feret diameters over the voxel boxes: a x b x c voxels measure sqrt((a sx)^2 + (b sy)^2 + (c sz)^2)
    np.testing.assert_allclose(s["largest_diameter_mm"], [math.sqrt(2 ** 2 + 3 ** 2 + 10 ** 2),
                                                          math.sqrt(2 ** 2 + 2 ** 2 + 5 ** 2)])
    np.testing.assert_allclose(sorted(s["lesion_volume_mm3"]), [2.5, 5.0, 60.0])
    # the same masks at another spacing: counts unchanged, millimetres follow the spacing
    iso = metrics.mask_statistics(_two_lesion_volumes(), SampleSpace((20, 20, 10)))
    assert iso["largest_diameter_mm"][0] == pytest.approx(math.sqrt(4 + 9 + 16))
    out = metrics.compare_masks(_two_lesion_volumes(), _two_lesion_volumes()[:2], SampleSpace((20, 20, 10), spacing))
    assert list(out) == ["lesions", "volume_fraction", "largest_diameter_mm", "lesion_volume_mm3", "empty_fraction"]
    assert out["lesions"]["real_mean"] == pytest.approx(1.0) and out["lesions"]["synthetic_mean"] == pytest.approx(1.5)
    assert out["empty_fraction"] == {"real": pytest.approx(1 / 3), "synthetic": 0.0}
    assert out["largest_diameter_mm"]["wasserstein"] == 0.0  # both have the same largest lesions


def test_3d_lesions_are_matched_as_26_connected_components():
    spacing = (1.0, 1.0, 2.0)
    truth = np.zeros((16, 16, 8), np.uint8)
    truth[2:5, 2:5, 2:5] = 1  # lesion A: 27 voxels
    truth[10:12, 10:12, 5:7] = 1  # lesion B: 8 voxels, missed
    pred = np.zeros_like(truth)
    pred[2:5, 2:5, 2:4] = 1  # 18 voxels of A
    pred[5, 5, 4] = 1  # touches A's prediction at a corner only: the same predicted lesion in 3D
    pred[14, 1, 0] = 1  # a false positive, one voxel
    m = match_lesions(truth, pred, spacing)
    np.testing.assert_array_equal(m.found, [True, False])
    # lesion Dice: A against the whole predicted lesion touching it (19 voxels), 18 of them inside A
    np.testing.assert_allclose(m.dice, [2 * 18 / (27 + 19), 0.0])
    np.testing.assert_allclose(m.diameters, [math.sqrt(9 + 9 + 36), math.sqrt(4 + 4 + 16)])
    np.testing.assert_allclose(m.false_positive_diameters, [math.sqrt(1 + 1 + 4)])
    # scored per volume: a second, lesion-free volume predicted empty halves the false positives per volume
    empty = np.zeros_like(truth)
    test = LesionTest(np.zeros((2, 1, *truth.shape), np.float32), np.stack([truth, empty]), spacing,
                      SizeBins.from_edges([10.0]), resamples=50)
    summary = test.score(np.stack([pred, empty]), seed=0)
    assert summary["items"] == 2 and summary["all"]["lesions"] == 2
    assert summary["all"]["sensitivity"]["value"] == pytest.approx(0.5)
    assert summary["all"]["false_positives_per_item"]["value"] == pytest.approx(0.5)
    # and by the BraTS-METS rules (lesions of 54 and 16 mm³, both kept): A's Dice 36/46, B missed, one false
    # positive -> (36/46 + 0) / 3 for the first volume; the empty pair scores 1
    brats = summary["brats_mets"]
    assert (brats["num_tp"], brats["num_fp"], brats["num_fn"]) == (1, 1, 1)
    assert brats["lesionwise_dice"]["value"] == pytest.approx((36 / 46 / 3 + 1) / 2)


def test_2_5d_slices_come_from_the_middle_of_each_axis_with_square_pixels():
    assert plane_positions(16, 4, 0.5).tolist() == [4, 6, 9, 11]
    assert plane_positions(8, 20, 1.0).tolist() == list(range(8))  # never more slices than the axis holds
    x, y, z = np.meshgrid(np.arange(32), np.arange(32), np.arange(16), indexing="ij")
    volume = (z / 100.0).astype(np.float32)[None]  # each axial slice holds its own z / 100
    planes = plane_slices(volume, (1.0, 1.0, 2.0), per_plane=4, fraction=0.5)
    assert {k: tuple(v.shape) for k, v in planes.items()} == {
        "axial": (4, 1, 32, 32), "coronal": (4, 1, 32, 32), "sagittal": (4, 1, 32, 32)}
    np.testing.assert_allclose(planes["axial"][:, 0, 10, 10].numpy(), [0.04, 0.06, 0.09, 0.11], atol=1e-6)
    # 1 mm voxels: a coronal plane spans 32 mm by 16 mm, so it is centred on the square with 8 empty columns each side
    ones = plane_slices(np.ones((1, *SHAPE), np.float32), (1.0, 1.0, 1.0), per_plane=2, fraction=0.5)["coronal"]
    assert ones.shape == (2, 1, 32, 32)
    assert (ones[:, 0, :, 8:24] == 1).all() and (ones[:, 0, :, :8] == 0).all() and (ones[:, 0, :, 24:] == 0).all()


# ============================================================================ end to end
@pytest.fixture(scope="module")
def real3d(tmp_path_factory) -> Path:
    """8 phantom patients 32x32x16 (4 train, 2 val, 2 test) and one lesion-free test patient."""
    root = tmp_path_factory.mktemp("eval3d") / "real"
    write_dataset(root, n_patients=8, shape=SHAPE, splits=("train", "train", "val", "test"), keys=("bravo", "seg"))
    for key, volume in make_patient(SHAPE, seed=99, lesion_radius=0, keys=("bravo", "seg")).items():
        save_volume(modality_path(root / "test" / "patient_free", key), volume, np.diag([1.0, 1.0, 2.0, 1.0]),
                    is_mask=key == "seg")
    return root


def _synthetic3d(real: Path, out: Path, cache: Path, shape=SHAPE) -> Path:
    """A 3D set in medgen-generate's layout: the real train volumes at ``shape``, as RAS NIfTI volumes."""
    c = open_or_build_cache(split_patients(real, "train"), VolumeSpec(keys=("bravo", "seg"), volume_shape=SHAPE),
                            cache, progress=False)
    affine = np.diag([*c.spacing, 1.0])
    for i in range(len(c)):
        d = np.asarray(c.data[i], np.float32)
        if tuple(shape) != SHAPE:
            d = d[:, :shape[0], :shape[1], :shape[2]]
        for k, key in enumerate(("bravo", "seg")):
            save_volume(modality_path(out / "train" / f"syn_{i:06d}", key), d[k], affine, is_mask=key == "seg")
    return out


def _cfg(real: Path, synthetic: Path, out: Path, feature_net: Path, **extra):
    settings = {"real_dir": str(real), "synthetic_dir": str(synthetic), "out_dir": str(out),
                "cache_dir": str(out.parent / "cache"), "seeds": [0], "num_workers": 0, "diversity_pairs": 10,
                "budget": {"steps": 10, "batch_size": 2}, "lesions": {"resamples": 20},
                "features": {"network": str(feature_net), "kid_subsets": 5, "kid_subset_size": 10,
                             "slices_per_plane": 4}, **extra}
    return evaluate_config(settings)


def test_a_3d_set_is_evaluated_as_volumes_with_a_three_plane_report(tmp_path, real3d, feature_net):
    synthetic = _synthetic3d(real3d, tmp_path / "syn", tmp_path / "cache")
    out = tmp_path / "eval"
    r = evaluate(_cfg(real3d, synthetic, out, feature_net), torch.device("cpu"), progress=False)
    assert (r["unit"], r["space"]["shape"]) == ("volume", list(SHAPE))
    assert r["space"] == {"shape": list(SHAPE), "spacing": r["spacing_mm"]["real"]}
    assert not [key for key in _keys(r) if "slice" in key and key != "features.slices_per_plane"]
    assert r["distribution"]["items"] == {"synthetic": 4, "real": 2}  # the lesion-free test volume is no reference
    m = r["distribution"]["masks"]
    assert m["lesions"]["real_mean"] == 1.0 and m["lesions"]["synthetic_mean"] == 1.0  # one phantom lesion each
    # a sphere of radius 3 voxels of 1 x 1 x 2 mm: about 7 x 7 x 14 mm, whatever the cache's resampling
    assert 11 < m["largest_diameter_mm"]["real_mean"] < 18 and 11 < m["largest_diameter_mm"]["synthetic_mean"] < 18
    assert min(r["anatomy"]["inside_brain"].values()) > 0.9
    assert "no manifest.csv" in r["paired"]["skipped"]  # a set made by hand
    # 2.5D FID: each plane from 4 slices of each volume, their mean reported as fid_2.5d
    f = r["features"]["bravo"]
    assert set(f["planes"]) == {"axial", "coronal", "sagittal"}
    assert all(e["n_real"] == 2 * 4 and e["n_synthetic"] == 4 * 4 for e in f["planes"].values())
    assert f["fid_2.5d"] == pytest.approx(np.mean([e["fid"] for e in f["planes"].values()]))
    assert "fid_real_val_vs_test_2.5d" in f
    # the 3D downstream experiment: volumes to train on, Dice per real test volume, lesions scored in 3D
    d = r["downstream"]
    assert [d[n]["train_items"] for n in ("real", "real+synthetic", "synthetic")] == [4, 8, 4]
    assert all(0 <= d[n]["mean"] <= 1 for n in ("real", "real+synthetic", "synthetic"))
    les = r["lesions"]
    assert (les["unit"], les["lesion_items"], les["lesion_free_items"], les["test_items"]) == ("volume", 2, 1, 3)
    assert sum(les["test_lesions"].values()) == 2 and len(les["spacing_mm"]) == 3
    assert r["adherence"]["synthetic_items"] == 4 and r["adherence"]["real_test_items"] == 2
    ckpt = torch.load(out / "seg_net.pt", weights_only=False)
    assert ckpt["space"]["shape"] == list(SHAPE) and "spatial_dims" not in ckpt
    _check_report(out, r)


def _keys(tree, where: str = "") -> list[str]:
    """Every key of a JSON tree, dotted."""
    if isinstance(tree, list):
        return [k for item in tree for k in _keys(item, where)]
    if not isinstance(tree, dict):
        return []
    return [k for key, value in tree.items() for k in [f"{where}{key}", *_keys(value, f"{where}{key}.")]]


def _check_report(out: Path, r: dict) -> None:
    assert json.loads((out / "metrics.json").read_text())["features"]["bravo"]["fid_2.5d"] == pytest.approx(
        r["features"]["bravo"]["fid_2.5d"])
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(figures) == sorted(re.findall(r'<img src="([^"]+)"', page))
    assert set(figures) == {"planes_real.png", "planes_synthetic.png", "intensity_histograms.png",
                            "mask_statistics.png", "downstream.png", "lesions.png"}
    for text in ("A 3D synthetic set", "## Masks (3D, per volume)", "| largest diameter mm |",
                 "FID and KID, 2.5D", "| bravo (2.5D: mean of planes) |", "Dice on real test volumes",
                 "by lesion size, 3D lesions", "| lesion voxels inside the brain |"):
        assert text in md, text
    # each sheet: two volumes per row, each as its three planes at 4 px per finest voxel (128 // 32)
    for name, n in (("real", 2), ("synthetic", 4)):
        tile = render_planes(np.zeros(SHAPE, np.float32), None, r["spacing_mm"][name], 4)
        expected = contact_sheet([tile] * n, columns=2).shape
        with Image.open(out / f"planes_{name}.png") as im:
            assert (im.height, im.width, len(im.getbands())) == expected
        assert tile.shape[1] > 3 * 32 * 4  # three planes side by side


def test_a_2d_look_at_a_3d_set_and_refusals(tmp_path, real3d, feature_net):
    synthetic = _synthetic3d(real3d, tmp_path / "syn", tmp_path / "cache")
    r = evaluate(_cfg(real3d, synthetic, tmp_path / "e2d", feature_net, spatial_dims=2, downstream=False,
                      budget={"steps": 2, "batch_size": 2}), torch.device("cpu"), progress=False)
    assert (r["unit"], r["space"]["shape"]) == ("slice", [32, 32])
    assert r["space"]["shape"] == [32, 32]
    assert r["distribution"]["items"]["synthetic"] > 4  # the axial slices of the 4 volumes
    assert "fid" in r["features"]["bravo"]
    odd = _synthetic3d(real3d, tmp_path / "odd", tmp_path / "cache", shape=(32, 30, 16))
    with pytest.raises(EvaluationError, match=r"synthetic_dir=.*odd: its volumes are 32x30x16, but the 3D downstream "
                                              r"segmenter needs every axis a multiple of 8 \(e.g. 32x32x16\)"):
        evaluate(_cfg(real3d, odd, tmp_path / "e", feature_net), progress=False)
    flat = tmp_path / "flat" / "train" / "syn_0000"
    for key in ("bravo", "seg"):
        save_volume(modality_path(flat, key), np.zeros((32, 32, 1), np.float32), np.eye(4), is_mask=key == "seg")
    with pytest.raises(EvaluationError, match=r"spatial_dims=3 but the samples in .*flat are single slices \[32, 32, 1\]"):
        evaluate(_cfg(real3d, tmp_path / "flat", tmp_path / "e", feature_net, spatial_dims=3), progress=False)
    with pytest.raises(EvaluationError, match=r"image_size=64 but the synthetic volumes in .* are 32x32x16 voxels"):
        evaluate(_cfg(real3d, synthetic, tmp_path / "e", feature_net, image_size=64), progress=False)


def test_a_3d_segmenter_checkpoint_is_checked_against_the_volume_shape(tmp_path):
    space = SampleSpace(SHAPE)
    path = save_segmenter(build_segmenter(1, space), tmp_path / "seg_net.pt", ["bravo"], space)
    net = load_segmenter(path, ["bravo"], space, torch.device("cpu"))
    assert net(torch.zeros(1, 1, 32, 32, 16)).shape == (1, 1, 32, 32, 16)
    with pytest.raises(EvaluationError, match=r"segments \['bravo'\] at 32x32x16 voxels, but the synthetic set holds "
                                              r"\['bravo'\] at 64x64x32 voxels"):
        load_segmenter(path, ["bravo"], SampleSpace((64, 64, 32)), torch.device("cpu"))


def test_the_augmentation_experiment_takes_a_3d_set_whole(tmp_path, real3d, capsys):
    """medgen-augment with a set of volumes: the 3D segmenter on real and real + synthetic volumes,
    the set's lesions counted as 26-connected 3D components, and a report that speaks of volumes."""
    from scipy import ndimage

    from medgen.scripts.augment import main

    synthetic = _synthetic3d(real3d, tmp_path / "syn", tmp_path / "cache")
    out = tmp_path / "augment"
    assert main(["--real", str(real3d), "--synthetic", f"copy={synthetic}", "--out", str(out), "--seeds", "0",
                 "--steps", "2", "--cache-dir", str(tmp_path / "cache")]) == 0
    result = json.loads((out / "augmentation.json").read_text())
    assert result["unit"] == "volume" and result["space"]["shape"] == list(SHAPE)
    assert not [key for key in _keys(result) if "slice" in key]
    masks = [load_volume(p)[0] > 0 for p in sorted(synthetic.glob("train/*/seg.nii.gz"))]
    lesions = sum(ndimage.label(m, structure=np.ones((3, 3, 3)))[1] for m in masks)
    assert result["synthetic"]["copy"]["items"] == len(masks) == 4
    assert sum(result["synthetic"]["copy"]["lesions"].values()) == lesions > 0
    assert result["sets"]["real+copy"]["train_items"] == result["sets"]["real"]["train_items"] + 4
    page = (out / "augmentation.md").read_text()
    assert "| set | made by | volumes |" in page and "false positives / volume" in page and "train lesion volumes" in page
    assert "slice" not in page
