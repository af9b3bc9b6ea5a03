"""LR range test: the suggestion on a known curve, and a real sweep writing its plot."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from medgen.diffusion.lr_finder import find_lr, lr_schedule, save_lr_find, suggest_lr


def test_suggestion_on_a_known_curve():
    lrs = np.geomspace(1e-6, 1.0, 121)
    x = np.log10(lrs)
    loss = 1 / (1 + np.exp(3 * (x + 3))) + 0.2 + np.where(x > -1, (x + 1) ** 2, 0)  # steepest at 1e-3, min ~1e-1
    suggested, at_min = suggest_lr(lrs, loss)
    assert suggested == pytest.approx(1e-3, rel=0.15)
    assert 3e-2 < at_min < 2e-1
    # noise at the very start of the sweep is not mistaken for the steepest descent
    noisy = loss.copy()
    noisy[1] -= 0.3
    assert suggest_lr(lrs, noisy)[0] == pytest.approx(1e-3, rel=0.15)


def test_schedule_is_geometric_and_checked():
    s = lr_schedule(1e-6, 1e-2, 5)
    np.testing.assert_allclose(s, [1e-6, 1e-5, 1e-4, 1e-3, 1e-2])
    with pytest.raises(ValueError):
        lr_schedule(1e-2, 1e-6, 10)


def test_sweep_on_the_configured_run_writes_plot_and_json(tiny_cfg, tmp_path):
    result = find_lr(tiny_cfg("mode=bravo"), tmp_path / "lr", min_lr=1e-6, max_lr=1.0, num_steps=15, progress=False)
    assert 5 <= len(result.lrs) <= 15 and all(b > a for a, b in zip(result.lrs, result.lrs[1:]))
    assert 1e-6 / 10 <= result.suggested_lr <= 1.0
    # the smoothed curve is an average of the raw one: same first value, within the raw range
    assert result.losses[0] == pytest.approx(result.raw_losses[0])
    assert min(result.raw_losses) <= min(result.losses) and max(result.losses) <= max(result.raw_losses)
    png, js = save_lr_find(result, tmp_path / "out")
    assert Image.open(png).size[0] > 300
    assert json.loads(js.read_text())["suggested_lr"] == result.suggested_lr


def test_two_sweeps_started_in_the_same_second_get_folders_of_their_own(tmp_path, tiny_data, monkeypatch, capsys):
    from conftest import tiny_overrides

    from medgen.core.schema import compose_config
    from medgen.data.nifti_dataset import DataError
    from medgen.diffusion.run import folder as run_folder
    from medgen.scripts.lr_find import run

    monkeypatch.setattr(run_folder, "run_stem", lambda cfg: "rflow_16_20261126-120000")  # one second for both
    cfg = compose_config(tiny_overrides(tmp_path, tiny_data, "mode=bravo", "strategy=rflow", "lr_find.num_steps=5"),
                         config_name="lr_find")
    for _ in range(2):
        run(cfg)
    root = tmp_path / "runs" / "lr_find"
    assert sorted(p.name for p in root.iterdir()) == ["bravo_rflow_16_20261126-120000",
                                                      "bravo_rflow_16_20261126-120000_2"]
    for folder in root.iterdir():
        assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "lr_find.json", "lr_find.png"]
        assert json.loads((folder / "lr_find.json").read_text())["suggested_lr"] > 0
    assert f"plot: {root / 'bravo_rflow_16_20261126-120000_2' / 'lr_find.png'}" in capsys.readouterr().out
    # a sweep that stops before writing anything leaves no folder
    with pytest.raises(DataError, match="/nonexistent"):
        run(compose_config(tiny_overrides(tmp_path, tiny_data, "mode=bravo", "paths.data_dir=/nonexistent"),
                           config_name="lr_find"))
    assert len(list(root.iterdir())) == 2
