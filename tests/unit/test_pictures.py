"""Tiles, sheets and PNG files, on hand-built pictures."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from medgen.data.pictures import OUTLINE_RGB, contact_sheet, outline, render_tile, save_png, side_by_side


def test_outline_is_the_mask_minus_its_erosion():
    mask = np.zeros((5, 5))
    mask[1:4, 1:4] = 1.0
    mask[2, 2] = 0.5  # exactly 0.5 is background: a ring, all of it boundary
    expected = np.zeros((5, 5), bool)
    expected[1:4, 1:4] = True
    expected[2, 2] = False
    assert (outline(mask) == expected).all()


def test_render_tile_shows_the_plane_in_radiological_display_with_the_outline_in_red():
    image = np.array([[0.0, 0.5], [1.0, 0.2]], np.float32)  # RAS [X, Y]
    tile = render_tile(image, None, scale=1)
    # display [rows, cols] = plane[::-1, ::-1].T; grey = round(255 * value)
    assert tile.dtype == np.uint8 and tile.shape == (2, 2, 3)
    assert tile[..., 0].tolist() == [[51, 128], [255, 0]]
    assert (tile[..., 0] == tile[..., 2]).all()
    red = render_tile(image, np.ones((2, 2)), scale=3)  # a 2x2 lesion is all boundary
    assert red.shape == (6, 6, 3) and (red.reshape(-1, 3) == OUTLINE_RGB).all()


def test_contact_sheet_and_side_by_side_lay_tiles_out_on_white():
    tiles = [np.full((2, 3, 3), v, np.uint8) for v in (10, 20, 30)]
    sheet = contact_sheet(tiles, columns=2, pad=1)
    assert sheet.shape == (2 * 3 + 1, 2 * 4 + 1, 3)
    assert sheet[1, 1, 0] == 10 and sheet[1, 5, 0] == 20 and sheet[4, 1, 0] == 30
    assert sheet[0].max() == 255 == sheet[4, 5:8].min()  # the edge, and the empty fourth place
    row = side_by_side([np.zeros((2, 1, 3), np.uint8), np.zeros((3, 2, 3), np.uint8)], gap=2)
    assert row.shape == (3, 1 + 2 + 2, 3)
    assert row[..., 0].tolist() == [[0, 255, 255, 0, 0], [0, 255, 255, 0, 0], [255, 255, 255, 0, 0]]


def test_save_png_round_trips_and_writes_pillow_bytes(tmp_path: Path):
    rgb = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    grey = rgb[..., 0].copy()
    for array in (rgb, grey):
        path = save_png(array, tmp_path / "sub" / "picture.png")
        assert path == tmp_path / "sub" / "picture.png"
        assert (np.asarray(Image.open(path)) == array).all()
        expected = io.BytesIO()
        Image.fromarray(array).save(expected, format="PNG")
        assert path.read_bytes() == expected.getvalue()
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["picture.png"]  # no temporary left


def test_three_planes_cross_the_largest_lesion_with_voxels_in_proportion():
    from medgen.data.pictures import plane_centre, render_planes

    volume = np.zeros((16, 12, 8), np.float32)
    mask = np.zeros_like(volume)
    mask[3:6, 4:6, 2:4] = 1  # the largest lesion: 12 voxels, centre (4, 4.5, 2.5)
    mask[12, 10, 7] = 1  # a one-voxel lesion elsewhere
    assert plane_centre(mask, volume.shape) == (4, 4, 2)
    assert plane_centre(None, volume.shape) == (8, 6, 4)
    picture = render_planes(volume, mask, spacing=(1.0, 1.0, 2.0), scale=2)
    # axial [X, Y] -> 24 x 32; coronal [X, Z] -> 8*4 x 32; sagittal [Y, Z] -> 32 x 24; gaps of 2
    assert picture.shape == (32, 32 + 2 + 32 + 2 + 24, 3)
    red = np.all(picture == (255, 42, 42), axis=-1)
    assert red[:, :32].any() and red[:, 34:66].any() and red[:, 68:].any()  # the lesion outlined in every plane
    # the axial tile is the plane z=2: the one-voxel lesion at z=7 is not in it
    # (display column of x=12 is 15-12=3, pixels 6-7; the large lesion's x=3..5 are pixels 20-25)
    assert not red[:24, :2 * (16 - 12)].any() and red[:24, 20:26].any()
