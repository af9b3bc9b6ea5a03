"""medgen.data.preview: the montage PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datagen import write_dataset
from medgen.data.importers import png_slice_to_ras
from medgen.data.nifti_dataset import DataError, modality_path, save_volume
from medgen.data.preview import CONTOUR_COLOUR, _pick_slice, make_preview, preview_size, ras_to_display
from medgen.scripts.data import main as data_main


def _outline_pixels(png: Path) -> int:
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    want = np.array([int(CONTOUR_COLOUR[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(rgb - want).sum(axis=-1) < 60).sum())


def test_preview_writes_png_of_expected_size(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_dataset(root, n_patients=5, shape=(24, 20, 6), splits=("train", "val", "test"))
    out = make_preview(root, tmp_path / "sub" / "preview.png", n_patients=4)
    assert out == tmp_path / "sub" / "preview.png" and out.stat().st_size > 0
    with Image.open(out) as im:
        im.load()
        assert im.size == preview_size(4, 4) == (1000, 1100)
    assert _outline_pixels(out) > 0


def test_preview_columns_follow_present_modalities(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_dataset(root, n_patients=2, keys=("bravo", "seg"))
    out = make_preview(root, tmp_path / "p.png", n_patients=10)
    with Image.open(out) as im:
        assert im.size == preview_size(2, 1)


def test_preview_without_lesion_uses_middle_slice(tmp_path: Path) -> None:
    root = tmp_path / "data"
    folder = write_dataset(root, n_patients=1, keys=("t1_pre", "seg"))[0]
    save_volume(modality_path(folder, "seg"), np.zeros((32, 32, 8)), np.eye(4), is_mask=True)
    save_volume(modality_path(folder, "t1_pre"), np.random.default_rng(0).random((32, 32, 8)), np.eye(4))
    out = make_preview(root, tmp_path / "p.png")
    assert _outline_pixels(out) == 0
    assert _pick_slice(np.zeros((4, 4, 9)), 9) == 4
    mask = np.zeros((4, 4, 9))
    mask[1, 1, 6] = mask[1, 2, 6] = mask[0, 0, 2] = 1
    assert _pick_slice(mask, 9) == 6


def test_display_is_inverse_of_png_import() -> None:
    png = np.arange(12).reshape(3, 4)
    np.testing.assert_array_equal(ras_to_display(png_slice_to_ras(png)), png)


def test_preview_empty_dataset_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no patient folders"):
        make_preview(tmp_path / "empty", tmp_path / "p.png")
    with pytest.raises(DataError, match="does not exist"):
        make_preview(tmp_path / "missing", tmp_path / "p.png")
    with pytest.raises(ValueError, match="n_patients"):
        make_preview(tmp_path / "empty", tmp_path / "p.png", n_patients=0)
    assert not (tmp_path / "p.png").exists()


def test_cli_preview(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "data"
    write_dataset(root, n_patients=2)
    assert data_main(["preview", str(root), "--out", str(tmp_path / "p.png"), "--patients", "1"]) == 0
    assert "p.png" in capsys.readouterr().out
    with Image.open(tmp_path / "p.png") as im:
        assert im.size == preview_size(1, 4)
