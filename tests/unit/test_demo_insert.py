"""The demo's insertion stage asks only for lesions its scans can hold: at the volume demo's 32 x 32 x 16
voxels (13.8 mm across) a tiny lesion (< 10 mm) is under one voxel and insertion refuses it, which once
stopped `make demo-3d` at its fourth stage. Run here on the demo's own phantoms and shapes, with copies in
place of the demo's bravo model (no training), so that the request is the demo's."""

from __future__ import annotations

import json

import pytest

from medgen.demo import run as demo
from medgen.demo.profile import SLICES, VOLUMES
import medgen.generation as api

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("profile, shape", [(SLICES, 64), (VOLUMES, [32, 32, 16])], ids=["slices", "volumes"])
def test_the_demo_insertion_request_fits_the_demo_scans(tmp_path, monkeypatch, profile, shape):
    demo._phantoms(tmp_path, 4, 0, profile)
    real_generate, calls = api.generate, []

    def copies(**kwargs):  # the demo's request, painted by copy at the demo models' image size
        calls.append(kwargs["insert"]["painter"])
        kwargs.pop("image_checkpoint")
        kwargs["insert"] = {**kwargs["insert"], "painter": "copy", "image_size": shape, "modalities": ["bravo"]}
        return real_generate(progress=False, **kwargs)

    monkeypatch.setattr(api, "generate", copies)
    reports = demo.insert(tmp_path, tmp_path / "no-model", 0, profile)
    assert calls == list(demo.INSERT_PAINTERS)
    half = max(4, profile.pairs // 4) // 2  # one lesion per scan, half of each class
    for painter in demo.INSERT_PAINTERS:
        sizes = json.loads((tmp_path / "inserted" / painter / "lesion_sizes.json").read_text())["sizes"]
        painted = dict(zip(sizes["bins"], sizes["painted"]))
        assert painted == {name: (half if name in profile.insert_sizes else 0) for name in sizes["bins"]}
        assert reports[painter]["sizes"]["painted"] == sizes["painted"]
    assert (tmp_path / "insertion_sheet.png").is_file()
