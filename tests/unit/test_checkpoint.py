"""Checkpoint files: the committed fixture keeps loading, writes are atomic, bad files say why."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medgen.core import checkpoint as ck
from medgen.core.checkpoint import CheckpointError, config_diff, load_checkpoint, save_checkpoint
from medgen.diffusion.utils import load_model_from_checkpoint

FIXTURES = Path(__file__).parent.parent / "fixtures"


def test_committed_checkpoint_fixture_keeps_loading():
    ckpt = load_checkpoint(FIXTURES / "checkpoint_v1.pt")
    assert ckpt["format_version"] == 1 and ckpt["mode"] == "bravo" and ckpt["strategy"] == "ddpm"
    assert ckpt["step"] == 3 and ckpt["config"]["model"]["channels"] == [8, 16]
    model, _ = load_model_from_checkpoint(FIXTURES / "checkpoint_v1.pt")  # network from the checkpoint alone
    expected = torch.load(FIXTURES / "checkpoint_v1_expected.pt")
    with torch.no_grad():
        out = model(expected["x"], expected["t"])
    torch.testing.assert_close(out, expected["out"], rtol=1e-5, atol=1e-5)


def test_save_is_atomic_and_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "latest.pt"
    save_checkpoint(path, {"step": 1})
    real_save = torch.save

    def crash(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]  # no temp file left


def test_bad_files_say_why(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    good = FIXTURES.joinpath("checkpoint_v1.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a medgen checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    data = torch.load(FIXTURES / "checkpoint_v1.pt", weights_only=False)
    data["format_version"] = 99
    torch.save(data, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="newer than this medgen"):
        load_checkpoint(tmp_path / "future.pt")


def test_config_diff_lists_changed_keys_except_allowed():
    old = {"training": {"lr": 1, "epochs": 5}, "model": {"channels": [1, 2]}}
    new = {"training": {"lr": 2, "epochs": 9}, "model": {"channels": [1, 3]}, "extra": True}
    assert config_diff(old, new, allowed=("training.epochs",)) == [
        "extra: '<absent>' -> True", "model.channels: [1, 2] -> [1, 3]", "training.lr: 1 -> 2"]
    assert config_diff(old, new, allowed=("training", "model", "extra")) == []
