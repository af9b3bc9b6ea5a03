"""`pip install .` (not only editable): the wheel carries the Hydra configs and composes them."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_wheel_ships_the_configs_and_composes_them(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(REPO),
                            "-w", str(tmp_path / "wheel")], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("medgen-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "medgen/configs/config.yaml" in names
    for group in ("model/default", "strategy/ddpm", "strategy/rflow", "mode/seg", "mode/bravo", "mode/dual",
                  "training/default", "training/cpu", "training/fast_debug", "paths/local", "paths/cluster"):
        assert f"medgen/configs/{group}.yaml" in names, group
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    # the installed copy (not this checkout) composes a config
    assert "medgen/data/importers/nnunet.py" in names  # subpackages too
    code = ("import medgen; from medgen.diffusion.config import load_config; from medgen.data.importers import import_nnunet; "
            "c = load_config(['mode=dual', 'strategy=rflow']); print(medgen.__file__, c.mode.name, c.strategy.name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(tmp_path / "site" / "medgen" / "__init__.py"), "dual", "rflow"]
