"""The layers contract of pyproject.toml (``[tool.importlinter]``): scripts > demo > evaluation >
generation > diffusion > data > core. No module imports a layer above its own, not even inside a function."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import medgen

REPO = Path(__file__).resolve().parents[2]
PACKAGE = Path(medgen.__file__).resolve().parent  # the package these tests import

LINT = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def lint(src: Path, cwd: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with the repository's contract, on the ``medgen`` package found in ``src``."""
    return subprocess.run([sys.executable, "-c", LINT, "--no-cache", "--no-logo", str(REPO / "pyproject.toml")],
                          capture_output=True, text=True, cwd=cwd, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(src)})


LAYERS = ["scripts", "demo", "evaluation", "generation", "diffusion", "data", "core"]


def test_the_contract_lists_every_layer_top_down():
    """Every subpackage of medgen is a layer of the contract, in this order (highest first)."""
    contract, = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert contract["layers"] == LAYERS and contract["name"] == " > ".join(LAYERS)
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert packages == set(LAYERS), packages


def test_the_package_keeps_its_layers(tmp_path):
    out = lint(PACKAGE.parent, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Contracts: 1 kept, 0 broken." in out.stdout


def test_an_upward_import_breaks_the_contract_also_inside_a_function(tmp_path):
    """The guard itself: a copy of the package with two upward imports (one deferred into a
    function, one at module level) fails, naming each importer and the import."""
    copy = tmp_path / "src" / "medgen"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "configs"))
    (copy / "core" / "upward_probe.py").write_text(
        "def registry():\n    from medgen.diffusion.modes import MODES\n\n    return MODES\n")
    (copy / "data" / "upward_probe.py").write_text("import medgen.generation\n")
    (copy / "evaluation" / "upward_probe.py").write_text("from medgen.demo.run import run_demo\n")
    out = lint(copy.parent, tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Contracts: 0 kept, 1 broken." in out.stdout
    assert "medgen.core is not allowed to import medgen.diffusion" in out.stdout
    assert "medgen.core.upward_probe -> medgen.diffusion.modes (l.2)" in out.stdout
    assert "medgen.data is not allowed to import medgen.generation" in out.stdout
    assert "medgen.data.upward_probe -> medgen.generation (l.1)" in out.stdout
    assert "medgen.evaluation is not allowed to import medgen.demo" in out.stdout
    assert "medgen.evaluation.upward_probe -> medgen.demo.run (l.1)" in out.stdout
