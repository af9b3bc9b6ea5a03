"""The demo's training budget: bravo's minutes and rate come from what the seg run took."""

from __future__ import annotations

from pathlib import Path

import pytest

from medgen.demo import run as demo
from medgen.demo.profile import VOLUMES


@pytest.mark.parametrize("seg_minutes, bravo_minutes", [(5.0, 4.0), (7.0, 2.0), (3.0, 6.0), (8.5, 2.0)])
def test_bravo_gets_what_seg_left_at_the_rate_seg_measured(monkeypatch, seg_minutes, bravo_minutes):
    clock = {"now": 0.0}
    calls = []

    def fake_train(out, mode, minutes, seed, profile, seconds_per_step=None, *, train_run):
        calls.append((mode, minutes, seconds_per_step))
        clock["now"] += seg_minutes * 60 if mode == "seg" else minutes * 60
        return Path(mode), {"steps": 600 if mode == "seg" else 300}

    monkeypatch.setattr(demo, "train", fake_train)
    monkeypatch.setattr(demo.time, "perf_counter", lambda: clock["now"])
    seconds: dict = {}
    demo._train_models(Path("out"), 9.0, 0, VOLUMES, seconds, {}, train_run=None)
    seg, bravo = calls
    assert seg == ("seg", pytest.approx(9.0 * VOLUMES.seg_share), None)  # the probe times seg
    # 9 minutes in all, at least half of bravo's share (9 * 0.45 / 2 = 2.025 minutes)
    assert bravo[0] == "bravo" and bravo[1] == pytest.approx(max(bravo_minutes, 9.0 * (1 - VOLUMES.seg_share) / 2))
    assert bravo[2] == pytest.approx(seg_minutes * 60 / 600)  # seconds per step of the whole seg run


def test_a_reused_seg_model_leaves_bravo_its_share_and_its_probe(monkeypatch):
    calls = []

    def fake_train(out, mode, minutes, seed, profile, seconds_per_step=None, *, train_run):
        calls.append((mode, minutes, seconds_per_step))
        return Path(mode), {"steps": 600, "reused": True} if mode == "seg" else {"steps": 300}

    monkeypatch.setattr(demo, "train", fake_train)
    demo._train_models(Path("out"), 9.0, 0, VOLUMES, {}, {}, train_run=None)
    assert calls[1] == ("bravo", pytest.approx(9.0 * (1 - VOLUMES.seg_share)), None)
