"""``segmenter=nnunet`` without nnU-Net: the raw export, the one-line errors, and the backend's plumbing
(the job nnU-Net's interpreter gets, its folders, the predictions read back and scored), with a stand-in
interpreter that answers like nnU-Net's. The slow tier runs nnU-Net itself (tests/integration/test_nnunet.py)."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from medgen.core.schema import compose_config
from medgen.data.space import SampleSpace
from medgen.evaluation import EvaluationError, nnunet
from medgen.evaluation.config import validate_evaluate_config
from medgen.evaluation.downstream import ItemSet
from medgen.evaluation.requests import NnunetRequest, evaluation_request
from medgen.generation.writer import nnunet_dataset_json

pytestmark = pytest.mark.usefixtures("one_thread")

#: answers ``-c <version query>`` with a version; else runs the job as a "segmenter" that marks pixels above 0.5
FAKE_DRIVER = '''
import json, os, sys
from pathlib import Path
import nibabel as nib, numpy as np
job = json.loads(Path(sys.argv[2]).read_text())
if job["epochs"] == 13:
    print("nnU-Net says: out of luck"); sys.exit(3)
seen = Path(os.environ["nnUNet_raw"]).parent / "seen.jsonl"
with open(seen, "a") as f:
    f.write(json.dumps({**job, **{k: os.environ[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")},
                        "driver": sys.argv[1]}) + "\\n")
out = Path(job["predictions"]); out.mkdir(parents=True, exist_ok=True)
for p in sorted(Path(job["test_images"]).glob("*_0000.nii.gz")):
    img = nib.load(p)
    nib.save(nib.Nifti1Image((np.asarray(img.dataobj) > 0.5).astype(np.uint8), img.affine),
             out / (p.name[:-len("_0000.nii.gz")] + ".nii.gz"))
'''


def _fake_python(folder: Path) -> Path:
    (folder / "driver.py").write_text(FAKE_DRIVER)
    python = folder / "python"
    python.write_text(f"#!/bin/sh\nif [ \"$1\" = -c ]; then echo 9.9.9; exit 0; fi\n"
                      f"exec {sys.executable} {folder / 'driver.py'} \"$@\"\n")
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    return python


def _items(n: int, shape: tuple[int, ...], seed: int = 0) -> ItemSet:
    """Images whose bright pixels are the lesion: the fake segmenter gets them right."""
    rng = np.random.default_rng(seed)
    masks = (rng.random((n, *shape)) > 0.8).astype(np.uint8)
    return ItemSet((masks[:, None] * 0.9 + 0.05).astype(np.float32), masks)


@pytest.mark.parametrize("space", [SampleSpace((8, 8), (1.0, 1.0, 2.0)), SampleSpace((8, 8, 4), (1.0, 1.0, 2.0))],
                         ids=["slices", "volumes"])
def test_a_training_set_is_exported_in_nnunets_raw_format(tmp_path, space):
    data = ItemSet(np.random.default_rng(0).random((3, 2, *space.shape)).astype(np.float32), _items(3, space.shape).masks)
    root = nnunet.export_training_set(tmp_path, "real+synthetic", data, ["bravo", "t1_gd"], space)
    assert root.name == "Dataset002_real_synthetic"
    assert nnunet.export_training_set(tmp_path, "real+synthetic", data, ["bravo", "t1_gd"], space) == root  # again
    assert json.loads((root / "dataset.json").read_text()) == nnunet_dataset_json(
        ["bravo", "t1_gd"], 3, "real_synthetic", json.loads((root / "dataset.json").read_text())["description"])
    images, labels = sorted((root / "imagesTr").iterdir()), sorted((root / "labelsTr").iterdir())
    assert [p.name for p in images[:2]] == ["case_00000_0000.nii.gz", "case_00000_0001.nii.gz"] and len(images) == 6
    shape = space.either((8, 8, 1), (8, 8, 4))  # a slice is a one-voxel-thick case of nnU-Net's 2d configuration
    label = nib.load(labels[1])
    assert label.shape == shape and label.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(label.dataobj).reshape(space.shape), data.masks[1])
    assert np.allclose(np.asarray(nib.load(images[3]).dataobj).reshape(space.shape), data.images[1, 1])
    assert np.allclose(np.diag(label.affine)[:3], (1.0, 1.0, 2.0))


def test_no_nnunet_environment_is_one_line_saying_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.setattr(nnunet, "default_pythons", lambda: [tmp_path / ".nnunet-venv" / "bin" / "python"])
    with pytest.raises(EvaluationError, match=r"none was found .*make nnunet-venv.*nnunet\.python=") as info:
        nnunet.find_python(None)
    assert "\n" not in str(info.value)
    with pytest.raises(EvaluationError, match=r"nnunet.python=/no/env/bin/python: .* does not exist; run `make"):
        nnunet.find_python("/no/env/bin/python")
    # an interpreter without nnU-Net (medgen's own) is named
    request = NnunetRequest(python=sys.executable, epochs=1, iterations_per_epoch=1)
    with pytest.raises(EvaluationError, match=r"has no nnU-Net v2 \(.*nnunetv2.*\); run `make nnunet-venv`"):
        nnunet.NnunetSegmenter(request, tmp_path / "n", SampleSpace((8, 8)), ["bravo"], "cpu")
    # medgen-evaluate stops before it reads a set
    cfg = validate_evaluate_config(compose_config([f"real_dir={tmp_path}/missing", f"synthetic_dir={tmp_path}/s",
                                                   f"out_dir={tmp_path}/e", "segmenter=nnunet"], "evaluate"))
    from medgen.evaluation.evaluate import evaluate

    with pytest.raises(EvaluationError, match="make nnunet-venv"):
        evaluate(cfg, torch.device("cpu"), progress=False)


class _Cache:
    """An item set as the caches of :class:`~medgen.evaluation.sets.Sets` hold it (the mask last)."""

    def __init__(self, s: ItemSet):
        self.data = np.concatenate([s.images, s.masks[:, None].astype(np.float32)], 1)
        self.keys, self.spacing = ["bravo", "seg"], (1.0, 1.0, 2.0)

    def __len__(self) -> int:
        return len(self.data)


def _sets(train: ItemSet, test: ItemSet, synthetic: ItemSet, space: SampleSpace, root: Path):
    return SimpleNamespace(train=_Cache(train), test=_Cache(test), synthetic=_Cache(synthetic), segmenter=None,
                           image_keys=["bravo"], space=space, real_root=root, test_brain=None, warnings=[])


def test_the_nnunet_keys_reach_nnunet_and_its_predictions_are_scored(tmp_path):
    """segmenter=nnunet: each set and seed is one job for nnunet.python with the epoch budget, in
    folders of the evaluation; the predictions it writes are read back and scored like the DynUNet's."""
    from medgen.evaluation.evaluate import segmentation_metrics

    python = _fake_python(tmp_path)
    space = SampleSpace((16, 16), (1.0, 1.0, 2.0))
    sets = _sets(_items(4, (16, 16), 1), _items(5, (16, 16), 2), _items(3, (16, 16), 3), space, tmp_path)

    def request(*overrides: str):
        return evaluation_request(validate_evaluate_config(compose_config(
            ["real_dir=r", "synthetic_dir=s", "seeds=[0,1]", "budget.steps=2", "budget.batch_size=2",
             "lesions.resamples=10", "segmenter=nnunet", f"nnunet.python={python}", *overrides], "evaluate")))

    out = tmp_path / "e"
    result = segmentation_metrics(sets, request("nnunet.epochs=3", "nnunet.iterations_per_epoch=7"), out,
                                  torch.device("cpu"), False)
    d = result["downstream"]
    assert d["segmenter"]["name"] == "nnunet" and d["segmenter"]["version"] == "9.9.9"
    assert d["segmenter"]["configuration"] == "2d" and d["budget"] == {"epochs": 3, "iterations_per_epoch": 7,
                                                                        "steps": 21}
    assert d["real"]["mean"] == 1.0 and d["synthetic"]["per_seed"][1]["overall"] == 1.0  # the stand-in is exact
    assert result["lesions"]["sets"]["real"]["mean"]["all"]["sensitivity"] == 1.0
    jobs = [json.loads(line) for line in (out / "nnunet" / "seen.jsonl").read_text().splitlines()]
    assert [(j["dataset_id"], j["seed"]) for j in jobs] == [(1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1)]
    assert {(j["epochs"], j["iterations"], j["device"], j["configuration"]) for j in jobs} == {(3, 7, "cpu", "2d")}
    assert jobs[1]["nnUNet_results"] == str(out / "nnunet" / "nnUNet_results" / "seed1")
    assert jobs[0]["driver"] == str(nnunet.DRIVER) and nnunet.DRIVER.is_file()
    assert len(list((out / "nnunet" / "nnUNet_raw" / "Dataset002_real_synthetic" / "labelsTr").iterdir())) == 7
    assert "synthetic_dice" in result["adherence"] and (out / "seg_net.pt").is_file()  # a DynUNet reads the set
    # a failing nnU-Net is one line with the end of its log
    with pytest.raises(EvaluationError, match=r"nnU-Net failed training on the real set, seed 0 \(exit code 3\): "
                                              r"nnU-Net says: out of luck \(whole log: .*real_seed0.log\)"):
        segmentation_metrics(sets, request("nnunet.epochs=13"), tmp_path / "f", torch.device("cpu"), False)


def test_nnunet_keys_without_nnunet_are_reported_as_unused():
    from medgen.evaluation.config import unused_keys

    cfg = validate_evaluate_config(compose_config(["real_dir=r", "synthetic_dir=s", "nnunet.epochs=5"], "evaluate"))
    assert [k for k in unused_keys(cfg, ["nnunet.epochs"]) if "segmenter=nnunet" in k]
    off = validate_evaluate_config(compose_config(["real_dir=r", "synthetic_dir=s", "downstream=false",
                                                   "segmenter=nnunet"], "evaluate"))
    assert [k for k in unused_keys(off, ["segmenter"]) if k.startswith("segmenter=nnunet")]
    on = validate_evaluate_config(compose_config(["real_dir=r", "synthetic_dir=s", "segmenter=nnunet",
                                                  "nnunet.epochs=5"], "evaluate"))
    assert unused_keys(on, ["segmenter", "nnunet.epochs"]) == []
