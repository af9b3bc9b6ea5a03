"""Every flag of ``medgen-data`` (all its subcommands), ``medgen-demo`` and ``medgen-augment`` does something.

The flag rule, as ``tests/unit/test_every_key.py`` has it for the Hydra configs: a flag a command
accepts must have an effect, or be refused. For each command a ``COVERAGE`` table maps every
argument of every subcommand, read from the argparse parser the command builds (options by their
long name, positionals by their name: ``"phantom --max-lesions"``, ``"import src"``), to the node
id of a test that passes a non-default value and asserts something that depends on it (or a tuple
of node ids: the effect, then the test of the combination where the flag is refused or said not to
apply), or to ``"exempt: <reason>"``. The first tests below keep the tables honest: a flag added to
a parser without an entry fails, naming the flag, and every node id must exist.

Where no other test showed a flag's effect, the test is here, below the tables (cheap: the
commands' ``main`` on folders of a few tiny patients; the demo and medgen-augment with their stages
replaced by recorders, so that what each stage is asked to do is what is checked).

A flag that acts in one combination but is accepted and ignored without a word in another goes in
``SILENTLY_IGNORED``, with the file and line that drop it and a strict ``xfail`` test asserting
the rule (a warning naming the flag, or a refusal): it fails until the command warns or refuses,
and then the entry goes and the test, unmarked, is named in the flag's ``COVERAGE`` entry.
"""

from __future__ import annotations

import argparse
import functools
import logging
import re
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from conftest import missing_test
from datagen import make_patient, write_dataset
from PIL import Image
from scipy import ndimage

from medgen.data.nifti_dataset import modality_path, save_volume
from medgen.data.preview import preview_size
from medgen.scripts.data import main as data_main

REPO = Path(__file__).resolve().parents[2]
HERE = "tests/unit/test_every_flag.py"


# ============================================================================ the parsers' arguments
def _arguments(parser: argparse.ArgumentParser) -> list[str]:
    """The arguments of one parser: an option by its longest option string, a positional by its
    name (help and the subcommand choice left out)."""
    names = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        names.append(max(action.option_strings, key=len) if action.option_strings else action.dest)
    return names


@functools.lru_cache(maxsize=None)
def data_arguments() -> frozenset[str]:
    """``"<subcommand> <argument>"`` for every subcommand of ``medgen-data`` (from its build_parser)."""
    from medgen.scripts.data import build_parser

    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return frozenset([*_arguments(parser), *(f"{name} {arg}" for name, sub in subcommands.choices.items()
                                             for arg in _arguments(sub))])


@functools.lru_cache(maxsize=None)
def demo_arguments() -> frozenset[str]:
    """The arguments of ``medgen-demo``, from the parser it parses with."""
    from medgen.scripts import demo

    return frozenset(_arguments(demo.build_parser()))


@functools.lru_cache(maxsize=None)
def augment_arguments() -> frozenset[str]:
    """The arguments of ``medgen-augment``, from the parser it parses with."""
    from medgen.scripts import augment

    return frozenset(_arguments(augment.build_parser()))


# ============================================================================ the tables
def _t(path: str, name: str) -> str:
    return f"tests/{path}::{name}"


def _here(name: str) -> str:
    return f"{HERE}::{name}"


PHANTOM = "unit/test_phantom.py"
IMPORTERS = "unit/test_importers.py"
VALIDATE = "unit/test_validate.py"
PREVIEW = "unit/test_preview.py"

COVERAGE_DATA: dict[str, str] = {
    # ---- phantom
    "phantom --out": _t(PHANTOM, "test_cli_phantom"),
    "phantom --subjects": _t(PHANTOM, "test_cli_phantom"),  # 3 subjects: 3 x 5 files
    "phantom --size": _here("test_the_phantom_flags_shape_the_phantoms"),
    "phantom --slices": _here("test_the_phantom_flags_shape_the_phantoms"),
    "phantom --seed": _here("test_the_phantom_flags_shape_the_phantoms"),
    "phantom --split": _here("test_the_phantom_flags_shape_the_phantoms"),
    "phantom --workers": "exempt: parallelism only: the same files for any value (tests/unit/test_phantom.py::"
                         "test_generate_dataset_empty_splits_and_workers); below 1 refused",
    "phantom --lesion-sizes": _here("test_the_phantom_flags_shape_the_phantoms"),
    "phantom --max-lesions": _here("test_the_phantom_flags_shape_the_phantoms"),
    # ---- import
    "import --format": _t(IMPORTERS, "test_cli_nnunet"),  # and test_cli_png: the two formats
    "import src": _t(IMPORTERS, "test_cli_png"),
    "import dst": _t(IMPORTERS, "test_cli_png"),
    "import --map": _here("test_import_map_picks_the_channels_and_names_them"),
    "import --spacing": (_t(IMPORTERS, "test_cli_png"),  # the affine is diag(0.9, 0.9, 1.5); nnunet: refused
                         _here("test_import_spacing_with_nnunet_is_refused_naming_it")),
    "import --split": _t(IMPORTERS, "test_cli_nnunet"),  # 0.5,0.5,0: one patient in train/, one in val/
    "import --seed": (_here("test_import_seed_picks_the_split_of_each_patient"),  # without --split: refused
                      _here("test_import_seed_without_split_is_refused_naming_it")),
    # ---- check
    "check dir": _t(VALIDATE, "test_valid_dataset_is_ok"),
    "check --json": _t(VALIDATE, "test_json_output_parses"),
    "check --workers": "exempt: parallelism only: the same report for any value "
                       "(tests/unit/test_slices.py::test_parallel_build_and_check_equal_serial)",
    "check --keys": _here("test_check_keys_names_the_modalities_every_patient_must_have"),
    # ---- preview
    "preview dir": _t(PREVIEW, "test_cli_preview"),
    "preview --out": _t(PREVIEW, "test_cli_preview"),
    "preview --patients": (_t(PREVIEW, "test_cli_preview"),  # 1 patient: a montage of one row
                           _here("test_preview_patients_beyond_the_dataset_says_it_shows_fewer")),
}

COVERAGE_DEMO: dict[str, str] = {
    "--out": _here("test_the_demo_flags_reach_their_stages"),
    "--3d": _here("test_the_demo_flags_reach_their_stages"),
    # with a finished model in --out (a rerun): the model is reused, and the line saying so names --minutes
    "--minutes": (_here("test_the_demo_flags_reach_their_stages"),
                  _here("test_a_reused_model_names_the_flags_that_do_not_apply_to_it")),
    # with phantoms in --out (a rerun): they are reused, with a warning naming --subjects / --seed when they differ
    "--subjects": (_here("test_the_demo_flags_reach_their_stages"),
                   _here("test_a_demo_rerun_with_other_phantom_flags_says_they_do_not_apply")),
    "--pairs": _here("test_the_demo_flags_reach_their_stages"),
    "--seed": (_here("test_the_demo_flags_reach_their_stages"),
               _here("test_a_demo_rerun_with_other_phantom_flags_says_they_do_not_apply"),
               _here("test_a_reused_model_names_the_flags_that_do_not_apply_to_it")),
}

AUGMENT_CLI = "integration/test_augment_cli.py"
#: flags beside --synthetic: refused, naming each
_BESIDE_SYNTHETIC = _t(AUGMENT_CLI, "test_a_bad_synthetic_set_or_a_generation_flag_beside_it_is_one_line")
AUGMENT_INSERT = "integration/test_augment_insert.py"
_BESIDE_SYNTHETIC_INSERT = _t(AUGMENT_INSERT, "test_a_bad_insertion_setting_is_one_line_before_anything_runs")

COVERAGE_AUGMENT: dict[str, str] = {
    "--real": _here("test_the_augment_flags_reach_generation_and_the_experiment"),
    "--out": _here("test_the_augment_flags_reach_generation_and_the_experiment"),
    "--seg": (_here("test_the_augment_flags_reach_generation_and_the_experiment"), _BESIDE_SYNTHETIC),
    "--image": (_here("test_the_augment_flags_reach_generation_and_the_experiment"), _BESIDE_SYNTHETIC),
    "--target": (_here("test_the_augment_flags_reach_generation_and_the_experiment"), _BESIDE_SYNTHETIC),
    "--synthetic": _t(AUGMENT_CLI, "test_the_budget_reaches_the_experiment_whole_with_fp32_by_default"),
    "--insert": (_t(AUGMENT_INSERT, "test_the_insertion_flags_reach_generation"), _BESIDE_SYNTHETIC_INSERT),
    "--insert-target": (_t(AUGMENT_INSERT, "test_the_insertion_flags_reach_generation"), _BESIDE_SYNTHETIC_INSERT),
    "--num-images": (_here("test_the_augment_flags_reach_generation_and_the_experiment"), _BESIDE_SYNTHETIC),
    "--guidance": (_here("test_the_augment_flags_reach_generation_and_the_experiment"), _BESIDE_SYNTHETIC),
    "--seed": (_here("test_the_augment_flags_reach_generation_and_the_experiment"), _BESIDE_SYNTHETIC),
    "--generate": (_here("test_the_augment_flags_reach_generation_and_the_experiment"), _BESIDE_SYNTHETIC),
    "--seeds": _here("test_the_augment_flags_reach_generation_and_the_experiment"),
    "--steps": _t(AUGMENT_CLI, "test_the_budget_reaches_the_experiment_whole_with_fp32_by_default"),  # steps 7
    "--precision": _t(AUGMENT_CLI, "test_bf16_reaches_the_downstream_training_and_the_cache_follows_MEDGEN_CACHE_DIR"),
    "--cache-dir": _here("test_the_augment_flags_reach_generation_and_the_experiment"),
}

#: command -> (its arguments as its parser has them, its table)
COMMANDS: dict[str, tuple] = {
    "medgen-data": (data_arguments, COVERAGE_DATA),
    "medgen-demo": (demo_arguments, COVERAGE_DEMO),
    "medgen-augment": (augment_arguments, COVERAGE_AUGMENT),
}

#: (command, flag) -> the combination in which the flag is accepted and dropped without a word, where
#: in the code (``src/medgen/...py:LINE``), and `` -> `` the strict-xfail test that asserts the rule there.
#: Empty now: import --spacing with nnunet and import --seed without --split are refused, a demo rerun
#: names --subjects / --seed (phantoms) and --minutes / --seed (models) that do not apply to what it reuses,
#: preview --patients beyond the dataset says it shows fewer; their tests are in COVERAGE
SILENTLY_IGNORED: dict[tuple[str, str], str] = {}


# ============================================================================ the tables are honest
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_the_table_covers_exactly_the_parsers_arguments(command):
    arguments, table = COMMANDS[command]
    names = arguments()
    missing, stale = sorted(names - table.keys()), sorted(table.keys() - names)
    assert not missing, (f"{command}: no COVERAGE entry for {missing} ({HERE}): name a test that passes each a "
                         "non-default value and asserts its effect, or exempt it with the reason")
    assert not stale, f"{command}: COVERAGE entries for arguments its parser does not have: {stale}"


def test_the_argument_lists_come_from_the_parsers():
    """Every subcommand, options and positionals alike; the parsers of the demo and medgen-augment, built
    inside a function, too."""
    data = data_arguments()
    assert {"phantom --max-lesions", "import src", "import --format", "check --keys", "preview --patients"} <= data
    assert {name.split()[0] for name in data} == {"phantom", "import", "check", "preview"}
    assert {"--3d", "--minutes", "--out"} <= demo_arguments()
    assert {"--real", "--synthetic", "--generate", "--cache-dir"} <= augment_arguments()
    assert not any("help" in name for name in data | demo_arguments() | augment_arguments())


def _targets(target) -> tuple[str, ...]:
    """A COVERAGE entry's node ids (one, or a tuple of them)."""
    return (target,) if isinstance(target, str) else tuple(target)


def _node_ids() -> list:
    ids = [pytest.param(command, flag, node_id, id=f"{command}:{flag}" + (f":{i}" if i else ""))
           for command, (_, table) in COMMANDS.items() for flag, target in sorted(table.items())
           for i, node_id in enumerate(_targets(target)) if not node_id.startswith("exempt")]
    ids += [pytest.param(command, flag, where.rsplit(" -> ", 1)[1], id=f"{command}:{flag}:ignored")
            for (command, flag), where in SILENTLY_IGNORED.items()]
    return ids


@pytest.mark.parametrize("command, flag, node_id", _node_ids())
def test_every_node_id_exists(command, flag, node_id):
    problem = missing_test(node_id)
    assert problem is None, f"{command} {flag}: {problem}"


def test_every_exemption_has_a_reason():
    for command, (_, table) in COMMANDS.items():
        for flag, target in table.items():
            assert isinstance(target, str) or (target and all(isinstance(t, str) for t in target)), (command, flag)
            if isinstance(target, str) and target.startswith("exempt"):
                assert re.fullmatch(r"exempt: \S.*", target, re.DOTALL), f"{command} {flag}: {target!r} gives no reason"


def test_every_silently_ignored_flag_is_a_flag_with_its_evidence():
    for (command, flag), where in SILENTLY_IGNORED.items():
        assert flag in COMMANDS[command][0](), f"{command} {flag}: not an argument of its parser"
        assert re.search(r"src/medgen/\S+\.py:\d+", where), f"{command} {flag}: no file:line evidence"


# ============================================================================ medgen-data phantom
def _volume(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def _coarse_template():
    """A stand-in for the MNI152 template the phantoms warp (deriving the real one takes 10-20 s on
    2 cores): an ellipsoidal brain, white matter inside grey matter, on a 4 mm grid over the MNI box.
    The flags tested here act on the grid, the seeds, the splits and the lesions, not the anatomy."""
    from medgen.data import phantom_anatomy

    step, origin, shape = 4.0, np.array([-98.0, -134.0, -72.0]), (50, 59, 48)
    mm = np.meshgrid(*[origin[a] + step * np.arange(shape[a]) for a in range(3)], indexing="ij")
    radii = (68.0, 85.0, 62.0)
    r = np.sqrt(sum(((m - c) / s) ** 2 for m, c, s in zip(mm, phantom_anatomy.HEAD_CENTRE_MNI, radii)))
    brain, wm = np.clip((1.0 - r) * 10, 0, 1), np.clip((0.75 - r) * 10, 0, 1)
    gm = 0.9 * np.clip(brain - wm, 0, 1)
    vox_from_mni = np.eye(4)
    vox_from_mni[:3, :3] /= step
    vox_from_mni[:3, 3] = -origin / step
    return phantom_anatomy._Template(gm=gm.astype(np.float32), wm=wm.astype(np.float32),
                                     csf=np.clip(brain - gm - wm, 0, 1).astype(np.float32),
                                     dist=((r - 1.0) * min(radii)).astype(np.float32), vox_from_mni=vox_from_mni)


PHANTOM_BASE = ("--subjects", "4", "--size", "24", "--slices", "12")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """``medgen-data phantom`` with ``PHANTOM_BASE`` + flags: ``{subject: (split, bravo, seg)}``."""
    from medgen.data import phantom, phantom_anatomy

    root = tmp_path_factory.mktemp("phantoms")
    template = _coarse_template()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(phantom_anatomy, "load_template", lambda: template)
        mp.setattr(phantom, "load_template", lambda: template)

        @functools.lru_cache(maxsize=None)
        def run(*flags: str) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
            out = root / f"p{len(list(root.iterdir()))}"
            assert data_main(["phantom", "--out", str(out), *PHANTOM_BASE, *flags]) == 0
            return {p.name: (p.parent.name, _volume(p / "bravo.nii.gz"), _volume(p / "seg.nii.gz"))
                    for p in sorted(out.glob("*/phantom_*"))}

        yield run


def _lesions(seg: np.ndarray) -> int:
    return int(ndimage.label(seg > 0)[1])


@pytest.mark.parametrize("flag, value", [("--size", "32"), ("--slices", "16"), ("--seed", "1"),
                                         ("--split", "0.5,0,0.5"), ("--lesion-sizes", "cover"), ("--max-lesions", "1")])
def test_the_phantom_flags_shape_the_phantoms(phantoms, flag, value):
    base = phantoms()
    assert len(base) == 4 and {bravo.shape for _, bravo, _ in base.values()} == {(24, 24, 12)}
    if flag == "--max-lesions":  # cover draws 1 to --max-lesions lesions per head (default 15)
        base = phantoms("--lesion-sizes", "cover")
        changed = phantoms("--lesion-sizes", "cover", flag, value)
    else:
        changed = phantoms(flag, value)
    assert changed.keys() == base.keys()
    if flag in ("--size", "--slices"):
        want = (32, 32, 12) if flag == "--size" else (24, 24, 16)
        assert {bravo.shape for _, bravo, _ in changed.values()} == {want}
        assert {seg.shape for _, _, seg in changed.values()} == {want}
    elif flag == "--seed":
        assert all(not np.array_equal(changed[s][1], base[s][1]) for s in base)
    elif flag == "--split":
        assert Counter(split for split, _, _ in base.values()) == {"train": 3, "val": 1}  # 0.7,0.15,0.15
        assert Counter(split for split, _, _ in changed.values()) == {"train": 2, "test": 2}
    elif flag == "--lesion-sizes":  # lesions of every size class, up to 40 mm, in every head
        voxels = [sum(int(seg.sum()) for _, _, seg in run.values()) for run in (base, changed)]
        assert voxels[1] > 5 * voxels[0]
        assert all(_lesions(seg) >= 1 for _, _, seg in changed.values())
    else:
        assert max(_lesions(seg) for _, _, seg in base.values()) > 1
        assert all(_lesions(seg) == 1 for _, _, seg in changed.values())


# ============================================================================ medgen-data import
def _png_source(root: Path, n: int) -> Path:
    """BrainMetShare-like PNG patients ``Mets_<i>``: channel folders 0-3 and seg, 3 slices of 8 x 6."""
    rng = np.random.default_rng(0)
    for i in range(n):
        for folder in ("0", "1", "2", "3", "seg"):
            (root / f"Mets_{i}" / folder).mkdir(parents=True)
            for k in range(3):
                plane = rng.integers(0, 256, (8, 6), dtype=np.uint8)
                if folder == "seg":
                    plane = np.zeros((8, 6), np.uint8)
                    plane[3:5, 2:4] = 255
                Image.fromarray(plane, mode="L").save(root / f"Mets_{i}" / folder / f"{k}.png")
    return root


def _nnunet_source(root: Path, n: int) -> Path:
    """nnU-Net raw cases ``case_<i>`` of one channel (imagesTr, labelsTr), 6 x 5 x 4 voxels."""
    rng = np.random.default_rng(0)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(n):
        nib.save(nib.Nifti1Image(rng.normal(100, 20, (6, 5, 4)).astype(np.float32), np.eye(4)),
                 str(root / "imagesTr" / f"case_{i}_0000.nii.gz"))
        label = np.zeros((6, 5, 4), np.uint8)
        label[2:4, 2:4, 1:3] = 1
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(root / "labelsTr" / f"case_{i}.nii.gz"))
    return root


def test_import_map_picks_the_channels_and_names_them(tmp_path):
    src = _png_source(tmp_path / "src", 2)
    assert data_main(["import", "--format", "brainmetshare-png", str(src), str(tmp_path / "a")]) == 0
    assert data_main(["import", "--format", "brainmetshare-png", str(src), str(tmp_path / "b"),
                      "--map", "0=t1_gd,2=bravo"]) == 0
    default, mapped = tmp_path / "a" / "train" / "Mets_0", tmp_path / "b" / "train" / "Mets_0"
    assert sorted(p.name for p in default.iterdir()) == ["bravo.nii.gz", "flair.nii.gz", "seg.nii.gz",
                                                         "t1_gd.nii.gz", "t1_pre.nii.gz"]
    assert sorted(p.name for p in mapped.iterdir()) == ["bravo.nii.gz", "seg.nii.gz", "t1_gd.nii.gz"]
    # folder 0 is bravo by default and t1_gd with the map; folder 2 the reverse
    np.testing.assert_array_equal(_volume(mapped / "t1_gd.nii.gz"), _volume(default / "bravo.nii.gz"))
    np.testing.assert_array_equal(_volume(mapped / "bravo.nii.gz"), _volume(default / "t1_gd.nii.gz"))


def test_import_seed_picks_the_split_of_each_patient(tmp_path):
    src = _nnunet_source(tmp_path / "src", 4)

    def splits(seed: str) -> dict[str, str]:
        dst = tmp_path / f"seed{seed}"
        assert data_main(["import", "--format", "nnunet", str(src), str(dst), "--map", "0=bravo",
                          "--split", "0.5,0.5,0", "--seed", seed]) == 0
        return {p.name: p.parent.name for p in dst.glob("*/case_*")}

    base, changed = splits("0"), splits("1")
    assert Counter(base.values()) == Counter(changed.values()) == {"train": 2, "val": 2}
    assert changed != base


def _said(code: int, capsys, caplog) -> str:
    """What a command told its user: its exit code, stderr and its warnings."""
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    return f"exit {code}: {capsys.readouterr().err} {warnings}"


@pytest.mark.parametrize("spacing", ["0.5,0.5,0.5", "not numbers"])
def test_import_spacing_with_nnunet_is_refused_naming_it(tmp_path, capsys, caplog, spacing):
    """nnU-Net files carry their own spacing: --spacing (any value) is one line naming it, before anything is
    written; the same import without it goes through."""
    src, dst = _nnunet_source(tmp_path / "src", 1), tmp_path / "dst"
    with caplog.at_level(logging.WARNING):
        code = data_main(["import", "--format", "nnunet", str(src), str(dst), "--map", "0=bravo", "--spacing", spacing])
    assert _said(code, capsys, caplog).strip() == (
        "exit 1: medgen-data import: --spacing applies to --format brainmetshare-png only: nnunet files carry their "
        "own voxel spacing in their headers (leave --spacing out)")
    assert not dst.exists()
    assert data_main(["import", "--format", "nnunet", str(src), str(dst), "--map", "0=bravo"]) == 0


def test_import_seed_without_split_is_refused_naming_it(tmp_path, capsys, caplog):
    """Without --split every patient goes to train/ and no seed is read: --seed is one line naming it (both
    refusals at once with --spacing beside an nnU-Net import); with --split it is taken (the test above)."""
    src, dst = _nnunet_source(tmp_path / "src", 2), tmp_path / "dst"
    with caplog.at_level(logging.WARNING):
        code = data_main(["import", "--format", "nnunet", str(src), str(dst), "--map", "0=bravo", "--seed", "3"])
    said = _said(code, capsys, caplog).strip()
    assert said == ("exit 1: medgen-data import: --seed seeds the patient-level split and is read only with --split "
                    "(without it every patient goes to train/): give --split too, or leave --seed out"), said
    code = data_main(["import", "--format", "nnunet", str(src), str(dst), "--map", "0=bravo", "--seed", "0",
                      "--spacing", "1,1,1"])
    said = _said(code, capsys, caplog)
    assert code == 1 and said.count("\n") == 1 and "--spacing applies" in said and "; --seed seeds" in said, said
    assert not dst.exists()
    # the PNG import keeps its default spacing (1,1,1) when --spacing is not given, and --seed with --split is taken
    png = _png_source(tmp_path / "png", 2)
    assert data_main(["import", "--format", "brainmetshare-png", str(png), str(tmp_path / "p"), "--split", "0.5,0.5,0",
                      "--seed", "3"]) == 0
    (first, *_) = sorted((tmp_path / "p").glob("*/Mets_*/bravo.nii.gz"))
    np.testing.assert_allclose(nib.load(first).affine, np.eye(4))


# ============================================================================ medgen-data preview
def test_preview_patients_beyond_the_dataset_says_it_shows_fewer(tmp_path, capsys, caplog):
    write_dataset(tmp_path / "d", n_patients=2, shape=(16, 16, 6), keys=("bravo", "seg"))
    with caplog.at_level(logging.WARNING):
        assert data_main(["preview", str(tmp_path / "d"), "--out", str(tmp_path / "p.png"), "--patients", "5"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [f"{tmp_path / 'd'} holds 2 patient(s), fewer than the 5 asked for (--patients): the montage "
                        "shows 2 row(s)"], warnings
    with Image.open(tmp_path / "p.png") as im:
        assert im.size == preview_size(2, 1)
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # as many as there are: nothing to say
        assert data_main(["preview", str(tmp_path / "d"), "--out", str(tmp_path / "q.png"), "--patients", "2"]) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# ============================================================================ medgen-data check
def test_check_keys_names_the_modalities_every_patient_must_have(tmp_path, capsys):
    """By default every modality any patient has is required: patient_001 lacks patient_000's t1_gd."""
    patients = write_dataset(tmp_path / "d", n_patients=2, shape=(16, 16, 6), keys=("bravo", "seg"))
    save_volume(modality_path(patients[0], "t1_gd"), make_patient((16, 16, 6), keys=("t1_gd",))["t1_gd"],
                np.diag([1.0, 1.0, 2.0, 1.0]))

    def check(*flags: str) -> tuple[int, str]:
        code = data_main(["check", str(tmp_path / "d"), "--workers", "0", *flags])
        return code, capsys.readouterr().out

    code, out = check()
    assert code == 1 and "missing modality 't1_gd'" in out and "patient_001" in out
    code, out = check("--keys", "bravo,seg")
    assert code == 0 and "OK: checked 2 patient(s)" in out
    code, out = check("--keys", "bravo,seg,flair")
    assert code == 1 and "missing modality 'flair'" in out and "t1_gd" not in out


# ============================================================================ medgen-demo
@pytest.fixture
def demo_stages(tmp_path, monkeypatch):
    """``medgen-demo``'s main with its stages replaced by recorders: ``run(*flags)`` gives what
    each stage was asked to do. The phantoms stage writes a folder per subject in data/train; training
    runs the demo's own budget arithmetic (train, _train_models) with a probe that says 1 s per epoch
    of 10 steps, and hands medgen-train's run the composed config it would train."""
    import medgen.generation
    from medgen.core import checkpoint, precision
    from medgen.data import phantom
    from medgen.demo import run as demo_run
    from medgen.scripts import demo
    from medgen.scripts import train as train_script

    seen: dict[str, list] = {}

    def phantoms(out, **kwargs):
        seen["phantoms"].append({"out": Path(out), **kwargs})
        for i in range(kwargs["subjects"]):
            (Path(out) / "train" / f"phantom_{i:04d}").mkdir(parents=True)
        return []

    def train_run(cfg, run_dir):
        seen["train"].append((Path(run_dir), cfg))
        return "done"

    def generate(**kwargs):
        seen["insert" if "insert" in kwargs else "generate"].append(kwargs)
        sheet = Path(kwargs["out_dir"]) / "contact_sheet.png"
        sheet.parent.mkdir(parents=True, exist_ok=True)
        sheet.write_bytes(b"png")
        return SimpleNamespace(status="done", contact_sheet=sheet, sizes={})

    def evaluate(out, seed, profile):
        seen["evaluate"].append({"out": out, "seed": seed, "profile": profile})
        return {}

    def write_summary(out, subjects, pairs, *args, **kwargs):
        seen["summary"].append({"subjects": subjects, "pairs": pairs})
        return out / "summary.md"

    monkeypatch.setattr(precision, "configure_backends", lambda: None)
    monkeypatch.setattr(phantom, "generate_dataset", phantoms)
    monkeypatch.setattr(demo_run, "_seconds_per_epoch", lambda overrides, out: (1.0, 10))
    monkeypatch.setattr(train_script, "run", train_run)
    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda path: {"best_val_loss": 0.5})
    monkeypatch.setattr(medgen.generation, "generate", generate)
    monkeypatch.setattr(demo_run, "evaluate", evaluate)
    monkeypatch.setattr(demo_run, "write_summary", write_summary)

    def run(*flags: str, out: str = "demo") -> dict[str, list]:
        seen.clear()
        seen.update({stage: [] for stage in ("phantoms", "train", "generate", "insert", "evaluate", "summary")})
        code = demo.main(["--out", str(tmp_path / out), *flags])
        return {"code": code, **{stage: list(calls) for stage, calls in seen.items()}}

    return run


def _seg_run(stages: dict) -> tuple[Path, object]:
    (run_dir, cfg), = [(d, c) for d, c in stages["train"] if c.mode.name == "seg"]
    return run_dir, cfg


@pytest.mark.parametrize("flag, value", [("--out", "elsewhere"), ("--3d", None), ("--minutes", "6"),
                                         ("--subjects", "8"), ("--pairs", "5"), ("--seed", "3")])
def test_the_demo_flags_reach_their_stages(demo_stages, tmp_path, flag, value):
    from medgen.demo.profile import SLICES, VOLUMES

    base = demo_stages(out="base")
    assert base["code"] == 0
    (phantoms,), (generate,), (evaluate,) = base["phantoms"], base["generate"], base["evaluate"]
    assert (phantoms["subjects"], phantoms["seed"], phantoms["lesion_sizes"]) == (20, 0, "clinical")
    assert (generate["num_images"], generate["seed"], evaluate["seed"], evaluate["profile"]) == (64, 0, 0, SLICES)
    # insertion: the demo's bravo model (repaint), then copies, into 16 real phantom scans of its data
    assert [(i["insert"]["painter"], i["num_images"], i["insert"]["into"], i["image_checkpoint"]) for i in base["insert"]] \
        == [(p, 16, str(tmp_path / "base" / "data"), str(tmp_path / "base" / "runs" / "bravo" / "demo"))
            for p in ("repaint", "copy")]
    _, seg = _seg_run(base)
    assert (seg.training.epochs, seg.seed, seg.model.image_size) == (12 * 0.5 * 60, 0, 64)  # 1 s per epoch

    if flag == "--out":
        changed = demo_stages(out=value)
        out = tmp_path / value
        assert changed["phantoms"][0]["out"] == out / "data" and (out / "contact_sheet.png").is_file()
        run_dir, seg = _seg_run(changed)
        assert run_dir == out / "runs" / "seg" / "demo" and seg.paths.data_dir == str(out / "data")
        assert Path(changed["generate"][0]["out_dir"]) == out / "synthetic"
        assert changed["evaluate"][0]["out"] == out
        return
    changed = demo_stages(*([flag] if value is None else [flag, value]))
    assert changed["code"] == 0
    (phantoms,), (generate,), (evaluate,) = changed["phantoms"], changed["generate"], changed["evaluate"]
    _, seg = _seg_run(changed)
    if flag == "--3d":  # the volume profile: its phantoms, 3D models, 8 minutes (55% for seg), 16 volumes
        assert (phantoms["lesion_sizes"], phantoms["max_lesions"]) == ("cover", 6)
        assert list(seg.model.image_size) == [32, 32, 16]
        assert seg.training.epochs == int(8 * 0.55 * 60)
        assert generate["num_images"] == 16 and evaluate["profile"] is VOLUMES
    elif flag == "--minutes":
        assert seg.training.epochs == 6 * 0.5 * 60
    elif flag == "--subjects":
        assert phantoms["subjects"] == 8 and changed["summary"][0]["subjects"] == 8
    elif flag == "--pairs":
        assert generate["num_images"] == 5 and changed["summary"][0]["pairs"] == 5
    else:
        assert (phantoms["seed"], seg.seed, generate["seed"], evaluate["seed"]) == (3, 3, 3, 3)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("flags, said", [
    (("--subjects", "8"), "--subjects 8 (20 on disk) does not apply to them"),
    (("--seed", "3"), "--seed 3 (drawn with seed 0) does not apply to them"),
    (("--subjects", "8", "--seed", "3"), "--subjects 8 (20 on disk) and --seed 3 (drawn with seed 0) do not apply"),
    (("--3d",), "--3d (their lesions were drawn for the slice demo: clinical, at most 15 per head) does not apply"),
])
def test_a_demo_rerun_with_other_phantom_flags_says_they_do_not_apply(demo_stages, tmp_path, caplog, flags, said):
    """A rerun into an --out with phantoms reuses them: a warning names each flag whose value differs from
    what they were drawn with, and summary.md gives the subjects on disk, not the number asked for."""
    assert demo_stages()["code"] == 0  # 20 phantoms drawn with seed 0
    with caplog.at_level(logging.INFO):
        same = demo_stages()
    assert not same["phantoms"] and not _warnings(caplog) and same["summary"][0]["subjects"] == 20
    assert f"reusing the 20 phantom subjects in {tmp_path / 'demo' / 'data'} (seed 0)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        rerun = demo_stages(*flags)
    assert rerun["code"] == 0 and not rerun["phantoms"]
    (warning,) = _warnings(caplog)
    assert warning.startswith(f"== 1/5 phantoms: reusing the 20 phantom subjects in {tmp_path / 'demo' / 'data'}; ")
    assert said in warning and warning.endswith("(give another --out to draw phantoms with these values)"), warning
    assert rerun["summary"][0]["subjects"] == 20


def test_a_demo_rerun_without_the_phantoms_record_says_seed_and_subjects_do_not_apply(demo_stages, tmp_path, caplog):
    """Phantoms written by a demo that did not record their seed (or by hand): the seed is unknown, so the
    rerun says --seed and --subjects do not apply to them, even when they are not given."""
    from medgen.demo.run import PHANTOMS_RECORD

    assert demo_stages("--subjects", "6")["code"] == 0
    (tmp_path / "demo" / PHANTOMS_RECORD).unlink()
    with caplog.at_level(logging.INFO):
        rerun = demo_stages()
    assert _warnings(caplog) == [f"== 1/5 phantoms: reusing the 6 phantom subjects in {tmp_path / 'demo' / 'data'}, "
                                 "drawn with a seed not recorded: --seed and --subjects do not apply to existing "
                                 "phantoms (give another --out to draw new ones)"]
    assert rerun["summary"][0]["subjects"] == 6


def test_a_demo_stage_stopped_by_a_signal_exits_as_a_stopped_run(demo_stages, monkeypatch, caplog):
    """A training that a signal stopped: one line saying how to go on, exit 75, and no further stage."""
    from medgen.core.signals import STOPPED_EXIT
    from medgen.scripts import train as train_script

    monkeypatch.setattr(train_script, "run", lambda cfg, run_dir: "stopped")
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as exited:
        demo_stages()
    assert exited.value.code == STOPPED_EXIT and "== 3/5 train bravo" not in caplog.text
    assert "medgen-demo: training seg was stopped by a signal; run the same command again to go on" in caplog.text


def test_a_reused_model_names_the_flags_that_do_not_apply_to_it(tmp_path, monkeypatch, caplog):
    """A finished model in --out is reused: the line saying so names --minutes and --seed, with the epochs and
    the seed it was trained with."""
    from medgen.core import checkpoint
    from medgen.demo import run as demo_run

    latest = tmp_path / "runs" / "seg" / "demo" / "checkpoints" / "latest.pt"
    latest.parent.mkdir(parents=True)
    latest.write_bytes(b"")
    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda path: {
        "epoch": 9, "step": 90, "config": {"seed": 0, "training": {"epochs": 9}, "model": {"image_size": 64}},
        "space": {"shape": [64, 64], "spacing": None}})
    monkeypatch.setattr(demo_run, "_seconds_per_epoch", lambda *a: pytest.fail("a finished model is not trained again"))
    with caplog.at_level(logging.INFO):
        run_dir, facts = demo_run.train(tmp_path, "seg", 6.0, 3, train_run=lambda *a: pytest.fail("nor trained"))
    assert run_dir == latest.parents[1] and facts["reused"] and facts["epochs"] == 9 and facts["space"].shape == (64, 64)
    assert f"seg model already trained: {run_dir} (9 epochs, seed 0); --minutes and --seed do not apply to it " \
           "(give another --out to train anew)" in caplog.text


# ============================================================================ medgen-augment
@pytest.fixture
def augment_stages(tmp_path, monkeypatch):
    """``medgen-augment``'s main with generation and the experiment replaced by recorders: ``run(*flags)``
    gives each set's validated medgen-generate config and the experiment's config, sets and folder.
    The checkpoints are empty files (nothing loads them here)."""
    import medgen.evaluation.augmentation as augmentation
    import medgen.generation.pipeline as pipeline
    from medgen.scripts.augment import main

    write_dataset(tmp_path / "real", n_patients=4, splits=("train", "train", "test"), keys=("bravo", "seg"))
    for name in ("seg.pt", "bravo.pt", "seg2.pt", "bravo2.pt"):
        (tmp_path / name).write_bytes(b"")
    seen: dict[str, list] = {}

    def run_generation(cfg, progress=True, command=""):
        seen["generate"].append(cfg)
        return SimpleNamespace(status="done")

    def run_experiment(cfg, sets, out_dir, device, progress=True):
        seen["experiment"].append({"cfg": cfg, "sets": sets, "out": Path(out_dir)})
        return {"sets": {}}

    monkeypatch.setattr(pipeline, "run_generation", run_generation)
    monkeypatch.setattr(augmentation, "run_experiment", run_experiment)
    monkeypatch.setenv("MEDGEN_CACHE_DIR", str(tmp_path / "cache"))

    def run(*flags: str, real: str = "real", out: str = "out", seg: str = "seg.pt", image: str = "bravo.pt") -> dict:
        seen.update(generate=[], experiment=[])
        assert main(["--real", str(tmp_path / real), "--out", str(tmp_path / out), "--seg", str(tmp_path / seg),
                     "--image", str(tmp_path / image), *flags]) == 0
        (experiment,) = seen["experiment"]
        return {"generate": {Path(c.out_dir).name: c for c in seen["generate"]}, **experiment}

    return run


@pytest.mark.parametrize("flag, value", [("--real", "other"), ("--out", "elsewhere"), ("--seg", "seg2.pt"),
                                         ("--image", "bravo2.pt"), ("--target", "big=large:1"), ("--num-images", "7"),
                                         ("--guidance", "2"), ("--seed", "5"), ("--generate", "steps=3"),
                                         ("--seeds", "4,7"), ("--cache-dir", "mine")])
def test_the_augment_flags_reach_generation_and_the_experiment(augment_stages, tmp_path, flag, value):
    base = augment_stages()
    out = tmp_path / "out"
    assert list(base["generate"]) == ["synthetic_real", "synthetic_small"]  # the default targets
    real_set, small_set = base["generate"].values()
    assert (real_set.lesion_sizes.target, small_set.lesion_sizes.target) == (
        "real", {"tiny": 4.0, "small": 2.0, "medium": 1.0, "large": 1.0})
    assert (real_set.seg_checkpoint, real_set.image_checkpoint) == (str(tmp_path / "seg.pt"),
                                                                    str(tmp_path / "bravo.pt"))
    assert (real_set.num_images, real_set.lesion_sizes.guidance, real_set.seed) == (200, 1.0, 0)
    assert real_set.steps != 3 and real_set.cache_dir == base["cfg"].cache_dir == str(tmp_path / "cache")
    assert base["sets"] == {"real": out / "synthetic_real", "small": out / "synthetic_small"} and base["out"] == out
    assert (base["cfg"].real_dir, list(base["cfg"].seeds)) == (str(tmp_path / "real"), [0, 1, 2])

    if flag == "--real":
        shutil.copytree(tmp_path / "real", tmp_path / "other")
        assert augment_stages(real="other")["cfg"].real_dir == str(tmp_path / "other")
        return
    if flag == "--out":
        changed = augment_stages(out=value)
        out = tmp_path / value
        sets = {"real": out / "synthetic_real", "small": out / "synthetic_small"}
        assert changed["out"] == out and changed["sets"] == sets
        assert [c.out_dir for c in changed["generate"].values()] == [str(folder) for folder in sets.values()]
        return
    if flag in ("--seg", "--image"):
        changed = augment_stages(**{flag[2:]: value})
        key = "seg_checkpoint" if flag == "--seg" else "image_checkpoint"
        assert {c[key] for c in changed["generate"].values()} == {str(tmp_path / value)}
        return
    changed = augment_stages(flag, str(tmp_path / value) if flag == "--cache-dir" else value)
    sets = list(changed["generate"].values())
    if flag == "--target":
        assert list(changed["generate"]) == ["synthetic_big"] and sets[0].lesion_sizes.target == {"large": 1.0}
        assert changed["sets"] == {"big": out / "synthetic_big"}
    elif flag == "--num-images":
        assert {c.num_images for c in sets} == {7}
    elif flag == "--guidance":
        assert {c.lesion_sizes.guidance for c in sets} == {2.0}
    elif flag == "--seed":
        assert {c.seed for c in sets} == {5}
    elif flag == "--generate":
        assert {c.steps for c in sets} == {3}
    elif flag == "--seeds":
        assert list(changed["cfg"].seeds) == [4, 7]
    else:
        assert {c.cache_dir for c in sets} == {changed["cfg"].cache_dir} == {str(tmp_path / "mine")}
