"""Nothing a user asks for is silently dropped: the fault matrix of issue "requests that are never
silently dropped", one test (or more) per case a user met.

 1. a size or count target with the gate off or with ``masks_from``: here (refused with the gate off,
    the default ``real`` said; ``masks_from`` picks real masks to meet the quotas)
 2. medgen-augment's ``budget.precision``: tests/integration/test_augment_cli.py (``--precision bf16``
    reaches the downstream training)
 3. medgen-augment and ``MEDGEN_CACHE_DIR``: test_augment_cli.py
 4. weights for classes the command line cannot name: here (a list in class order)
 5. the documented target examples: here (every example of README.md, docs/*.md and generate.yaml parses)
 6. medgen-augment with a 2D and a 3D set: test_augment_cli.py (one line, before any training)
 7. tracebacks for targets of the wrong form: here; medgen-augment's flags: test_augment_cli.py
 8. ``gate.max_attempts`` inside a batch: here
 9. the FID floor that disappeared without a reason: here
10. the memory of a size target: here
11. the benchmarks that crashed: tests/integration/test_benchmarks.py (slow: every script's --smoke)

and the doubtful ones: a conditioned model takes its edges under other names; guidance toward
nothing is refused. Keys with no effect in a run are named (generate, train, lr-find, evaluate).
"""

from __future__ import annotations

import csv
import json
import re
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import square_seg_model

from medgen.core.schema import compose_config
from medgen.generation import GenerationError, generate
from medgen.generation.config import ignored_keys, validate_generate_config
from medgen.data.space import SampleSpace
from medgen.generation.requests import GenerateRequest
from medgen.generation.sizes import resolve_count_target, resolve_target, slot_class

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]


def _settings(tmp_path, checkpoints, **extra):
    return {"seg_checkpoint": str(checkpoints["seg"]), "image_checkpoint": str(checkpoints["bravo"]), "batch_size": 4,
            "steps": 2, "precision": "fp32", "progress": False, "cache_dir": str(tmp_path / "cache"), **extra}


def _bins(out: Path) -> list[str]:
    with open(out / "manifest.csv") as f:
        return sorted(r["lesion_bins"] for r in csv.DictReader(f) if r["id"])


def _validate(*overrides: str):
    return validate_generate_config(compose_config(["image_checkpoint=i", "seg_checkpoint=s", *overrides],
                                                   config_name="generate"))


# ---------------------------------------------------------------------------- 1. targets with the gate off
def test_the_gate_off_keeps_every_mask_and_says_so_or_refuses_a_quota(tmp_path, tiny_checkpoints, monkeypatch, caplog):
    # quotas are what the gate meets: asked for with the gate off, one line before any model loads
    with pytest.raises(GenerationError, match=r"lesion_sizes.target=uniform: the gate meets the quotas, and "
                                              r"gate.enabled=false keeps every mask drawn; turn the gate on .* or set "
                                              r"lesion_sizes.target=model"):
        _validate("lesion_sizes.target=uniform", "gate.enabled=false")
    with pytest.raises(GenerationError, match=r"lesion_counts.target=\[1, 1, 0, 0\]: the gate meets the quotas"):
        _validate("lesion_counts.target=[1,1,0,0]", "gate.enabled=false")
    # the default real: every mask kept, the empty one too, and the log says the target is not applied
    square_seg_model(monkeypatch, [2, 0, 9])
    caplog.set_level("INFO", logger="medgen.generate")
    kept = generate(out_dir=str(tmp_path / "all"), num_images=3, gate={"enabled": False},
                    **_settings(tmp_path, tiny_checkpoints))
    with open(kept.out_dir / "manifest.csv") as f:
        assert [r["components"] for r in csv.DictReader(f)] == ["1", "0", "1"]
    assert not (kept.out_dir / "lesion_sizes.json").exists()
    assert ("gate.enabled=false keeps every mask drawn: lesion_sizes.target=real is not applied and "
            "lesion_counts.target=real is not applied (the gate meets the quotas)") in caplog.text


# ---------------------------------------------------------------------------- 1. targets with masks_from
def test_masks_from_picks_real_masks_to_meet_the_quotas(tmp_path, tiny_data, tiny_checkpoints, caplog):
    from medgen.generation.models import load_stage

    caplog.set_level("INFO", logger="medgen.generate")
    common = dict(image_checkpoint=str(tiny_checkpoints["bravo"]), masks_from=str(tiny_data), masks_split="train",
                  steps=2, batch_size=8, precision="fp32", progress=False, cache_dir=str(tmp_path / "cache"))
    every = generate(out_dir=str(tmp_path / "every"), num_images=None, **common)
    with open(every.out_dir / "manifest.csv") as f:
        largest = sorted(max(float(d) for d in r["lesion_diameters_mm"].split(";")) for r in csv.DictReader(f))
    edge = round((largest[len(largest) // 2 - 1] + largest[len(largest) // 2]) / 2, 2)  # the median splits them
    below = sum(d < edge for d in largest)
    assert 2 <= below <= len(largest) - 2, largest
    sized = {"bins": [edge], "target": [1, 3]}  # in class order: the names (<e mm, >=e mm) need no typing
    picked = generate(out_dir=str(tmp_path / "picked"), num_images=4, lesion_sizes=sized, **common)
    with open(picked.out_dir / "manifest.csv") as f:
        chosen = sorted(max(float(d) for d in r["lesion_diameters_mm"].split(";")) for r in csv.DictReader(f))
    assert sum(d < edge for d in chosen) == 1 and sum(d >= edge for d in chosen) == 3, (chosen, edge)
    report = json.loads((picked.out_dir / "lesion_sizes.json").read_text())
    assert list(report["output"].values()) == [1, 3] and report["target"] == "weights"
    assert "masks_from: the real masks of train/ are picked to meet lesion_sizes.target=" in caplog.text
    # the size is measured at the voxel size the manifest reports (the image model's)
    stage = load_stage(tiny_checkpoints["bravo"], "image", "image_checkpoint", device=torch.device("cpu"), compile="false")
    assert len(stage.space.mm) == 2
    # more of a class than the split holds: one line with the counts; nothing written
    n = 2 * below + 2
    with pytest.raises(GenerationError, match=rf"hold too few masks of some classes for num_images={n} "
                                              rf"\(picked/wanted: lesion_sizes: <{edge:g}mm {below}/{below + 1}, "):
        generate(out_dir=str(tmp_path / "short"), num_images=n, lesion_sizes={"bins": [edge], "target": [1, 1]},
                 **common)
    assert not (tmp_path / "short" / "train").exists()


@pytest.mark.parametrize("overrides, message", [
    (["lesion_sizes.target=uniform"], r"lesion_sizes.target=uniform: with masks_from, the real masks are picked to "
                                      r"meet the quotas of num_images masks; set num_images"),
    (["num_images=4", "lesion_sizes.guidance=2"], r"lesion_sizes.guidance=2 guides a seg model .* masks_from uses "
                                                  r"real masks"),
])
def test_masks_from_refuses_what_it_cannot_do_in_one_line(overrides, message):
    with pytest.raises(GenerationError, match=message):
        validate_generate_config(compose_config(["image_checkpoint=i", "masks_from=d", "num_images=null", *overrides],
                                                config_name="generate"))


# ---------------------------------------------------------------------------- 4, 5, 7. how targets are written
def test_weights_in_class_order_reach_classes_the_command_line_cannot_name():
    cfg = _validate("lesion_sizes.bins=[285,300]", "lesion_sizes.target=[1,0,3]")
    target = resolve_target(GenerateRequest.from_config(cfg).masks.sizes, 8, SampleSpace((64, 64), (10.0, 10.0)), None)
    assert target.bins.names == ("<285mm", "285-300mm", ">=300mm") and target.counts.tolist() == [2, 0, 6]
    counts = resolve_count_target(GenerateRequest.from_config(_validate("lesion_counts.target=[2,1,1,0]")).masks.counts,
                                  8, None, 10)
    assert counts.counts.tolist() == [4, 2, 2, 0] and counts.source == "weights"


def test_the_documented_target_examples_parse():
    """Every ``lesion_sizes.target=``/``lesion_counts.target=`` example of the README, the documentation
    pages (docs/*.md: the examples live in docs/generation.md) and the config file."""
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "configs" / "generate.yaml"]
    texts = "".join(path.read_text() for path in docs)
    examples = re.findall(r"'(lesion_(?:sizes|counts)\.target=\{[^']*\})'", texts)
    assert len(examples) >= 2, examples
    for example in examples:
        _validate(example)
    # the config file's comments, written as YAML
    yaml = (ROOT / "configs" / "generate.yaml").read_text()
    for key, example in re.findall(r"lesion_(sizes|counts):[^\n]*\n  target:[^\n]*e\.g\. (\{[^}]*\})", yaml):
        _validate(f"lesion_{key}.target={example.replace(' ', '')}")


@pytest.mark.parametrize("override, message", [
    ("lesion_sizes.target=5", r"lesion_sizes.target=5: use model, real, uniform, weights per class, e.g. \{tiny: 1, "
                              r"small: 1, medium: 1, large: 1\}, or a list of 4 weights in class order"),
    ("lesion_sizes.target=[1,2]", r"lesion_sizes.target: a list gives one weight per class in order, 4 for "
                                  r"\['tiny', 'small', 'medium', 'large'\]; got 2: \[1, 2\]"),
    ("lesion_counts.target=[1,a,1,1]", r"lesion_counts.target: weights must be numbers"),
    ("lesion_counts.target={1: 2, 2: 1, 3+: 1}", r"unknown class '3\+'; the classes of lesion_counts.classes are "
                                                 r"\['1', '2', '3', '4\+'\] \(or give a list of 4 weights"),
    ("lesion_sizes.bins=banana", r"lesion_sizes.bins: unknown binning 'banana'"),
])
def test_a_target_of_the_wrong_form_is_one_line_before_any_model_loads(override, message):
    with pytest.raises(GenerationError, match=message):
        _validate(override)


# ---------------------------------------------------------------------------- 8. max_attempts inside a batch
def test_gate_max_attempts_bounds_the_candidates_inside_a_batch(tmp_path, tiny_checkpoints, monkeypatch):
    drawn = square_seg_model(monkeypatch, [2])  # every candidate passes
    gate = {"enabled": True, "min_area": 0.0, "max_area": 1.0, "max_attempts": 1}
    with pytest.raises(GenerationError, match=r"accepted 1 of 1 generated masks .* short of num_images=16 within "
                                              r"gate.max_attempts=1"):
        generate(out_dir=str(tmp_path / "one"), num_images=16, gate=gate, lesion_sizes={"target": "model"},
                 lesion_counts={"target": "model"}, **_settings(tmp_path, tiny_checkpoints, batch_size=16))
    assert drawn[0] == 1  # one candidate sampled, not a batch of 16
    # a folder that holds more candidates (an earlier run with a higher limit) is read up to the limit only
    with pytest.raises(GenerationError, match=r"accepted 1 of 1 generated masks"):
        generate(out_dir=str(tmp_path / "one"), num_images=3, gate=gate, lesion_sizes={"target": "model"},
                 lesion_counts={"target": "model"}, **_settings(tmp_path, tiny_checkpoints, batch_size=16))
    square_seg_model(monkeypatch, [2, 0])  # every other candidate is empty
    with pytest.raises(GenerationError, match=r"accepted 2 of 3 generated masks .* gate.max_attempts=3"):
        generate(out_dir=str(tmp_path / "three"), num_images=3, gate={**gate, "max_attempts": 3},
                 lesion_sizes={"target": "model"}, lesion_counts={"target": "model"},
                 **_settings(tmp_path, tiny_checkpoints, batch_size=16))
    blocks = list((tmp_path / "three" / ".medgen" / "masks").glob("block_*.npz"))
    assert sum(np.load(b)["candidates"].size for b in blocks) == 3


# ---------------------------------------------------------------------------- doubtful: bins and guidance
def test_a_conditioned_model_takes_its_edges_under_other_names_and_refuses_guidance_toward_nothing():
    from types import SimpleNamespace

    from medgen.data.lesions import RANO_BM
    from medgen.generation.sizes import Targets, check_conditioning

    mode = SimpleNamespace(size_bins=RANO_BM, count_classes=None)
    asked = GenerateRequest.from_config(_validate("lesion_sizes.bins=[10,20,30]", "lesion_sizes.target=uniform"))
    same_edges = resolve_target(asked.masks.sizes, 4, SampleSpace((64, 64), (1.0, 1.0)), None)
    check_conditioning(mode, "seg.pt", 0.1, Targets(same_edges), 1.0)  # rano_bm's classes under edge names
    with pytest.raises(GenerationError, match=r"lesion_sizes.guidance=2 guides seg_checkpoint seg.pt toward the "
                                              r"classes asked, and .* ask for none \(model\)"):
        check_conditioning(mode, "seg.pt", 0.1, Targets(), 2.0)


# ---------------------------------------------------------------------------- 10. memory of a size target
def test_a_size_target_for_1e8_masks_asks_each_candidate_without_a_list_of_slots():
    cfg = _validate("lesion_sizes.target={tiny: 4, small: 2, medium: 1, large: 1}")
    tracemalloc.start()
    target = resolve_target(GenerateRequest.from_config(cfg).masks.sizes, 10 ** 8, SampleSpace((64, 64), (3.4, 3.4)), None)
    asked = target.requested([0, 1, 10 ** 8 - 1, 10 ** 8, 10 ** 8 + 1])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert target.counts.tolist() == [50_000_000, 25_000_000, 12_500_000, 12_500_000]
    assert peak < 1_000_000, peak  # a list of 1e8 slots would take gigabytes
    assert asked[0] == asked[3] and asked[1] == asked[4]  # slot j mod num_images


def test_each_slot_class_is_the_sorted_spread_of_the_quotas():
    """:func:`slot_class` against the definition it computes without a list: every slot's class after
    sorting the positions (k + 1/2) / counts[b], ties to the earlier class, in exact fractions."""
    from fractions import Fraction

    rng = np.random.default_rng(0)
    for _ in range(400):
        counts = [int(c) for c in rng.choice([0, 0, 1, 2, 3, 4, 6, 9, 12, 25], size=rng.integers(1, 6))]
        if not sum(counts):
            continue
        spread = [b for _, b in sorted((Fraction(2 * k + 1, 2 * c), b) for b, c in enumerate(counts) for k in range(c))]
        assert [slot_class(counts, s) for s in range(sum(counts))] == spread, counts


# ---------------------------------------------------------------------------- keys with no effect in a run
def test_keys_with_no_effect_in_a_run_are_named():
    cfg = validate_generate_config(compose_config(["image_checkpoint=i", "masks_from=d", "gate.max_area=0.2",
                                                   "seg_sampler=ddim", "brain_outline=as_drawn"],
                                                  config_name="generate"))
    assert ignored_keys(cfg) == [
        "gate.max_area=0.2 (real masks are used as they are, not gated with masks_from)",
        "seg_sampler=ddim (there is no seg model to sample with masks_from)",
        "brain_outline=as_drawn (the brains come from the real images with masks_from)"]
    assert ignored_keys(_validate("masks_split=train")) == [
        "masks_split=train (the seg model draws the masks with seg_checkpoint)"]
    assert ignored_keys(_validate("gate.max_area=0.2")) == []


# ---------------------------------------------------------------------------- 9. the FID floor says why it is missing
@pytest.mark.parametrize("val_slices, reason", [
    (None, "no val reference"),
    (1, "1 val slice(s)"),
])
def test_a_missing_fid_floor_is_listed_as_skipped_with_its_reason(feature_net, val_slices, reason):
    from types import SimpleNamespace

    from medgen.evaluation.downstream import ItemSet
    from medgen.evaluation.evaluate import feature_metrics
    from medgen.evaluation.report import skipped_metrics, summary_lines

    rng = np.random.default_rng(0)

    def images(n):
        return ItemSet(rng.random((n, 1, 16, 16), dtype=np.float32), np.zeros((n, 16, 16), np.float32))

    samples = {"real": images(6), "synthetic": images(6), "val": None if val_slices is None else images(val_slices)}
    from medgen.data.space import SampleSpace

    sets = SimpleNamespace(sample=samples.get, image_keys=("bravo",), space=SampleSpace((16, 16)),
                           real_root=Path("/data/real"))
    from medgen.evaluation.config import validate_evaluate_config
    from medgen.evaluation.requests import evaluation_request

    cfg = evaluation_request(validate_evaluate_config(compose_config(["real_dir=r", "synthetic_dir=s", f"features.network={feature_net}",
                                                   "features.kid_subsets=2", "features.kid_subset_size=3"],
                                                  config_name="evaluate")))
    out = feature_metrics(sets, cfg, torch.device("cpu"))
    assert "fid_real_val_vs_test" not in out["bravo"] and out["bravo"]["fid"] >= 0
    result = {"features": out, "out_dir": "/tmp/evaluation"}
    assert skipped_metrics(result) == [("features.bravo.floor", f"the floor (FID/KID of real val vs real test): "
                                        f"{reason} in /data/real, and it needs at least 2")]
    assert any(line.startswith("skipped: features.bravo.floor: the floor") for line in summary_lines(result))
    # with two val slices the floor is there and nothing is skipped
    samples["val"] = images(2)
    assert "fid_real_val_vs_test" in feature_metrics(sets, cfg, torch.device("cpu"))["bravo"]


# ---------------------------------------------------------------------------- keys a training or an evaluation does not use
def test_training_keys_a_run_does_not_use_are_named():
    from medgen.diffusion.config import load_config, unused_keys

    volumes = load_config(["model.image_size=[16,16,8]", "data.seg_positive_only=true",
                           "training.use_ema=false", "training.ema_decay=0.9"])
    given = ["model.image_size", "training.use_ema", "training.ema_decay", "data.seg_positive_only"]
    assert unused_keys(volumes, given) == [
        "data.seg_positive_only=True (volumes are used whole, no slice is selected)",
        "training.ema_decay=0.9 (training.use_ema=false)"]
    slices = load_config(["mode=bravo", "training.perceptual_slices=8"])
    assert unused_keys(slices, ["training.perceptual_slices"]) == [
        "training.perceptual_slices=8 (slices: model.image_size is one size)"]
    seg = load_config(["mode=seg", "training.perceptual_weight=0.1"])
    assert unused_keys(seg, ["training.perceptual_weight", "mode"]) == [
        "training.perceptual_weight=0.1 (the perceptual loss is never applied to masks (mode=seg))"]
    bravo = load_config(["mode=bravo", "training.perceptual_weight=0.1", "training.learning_rate=0.01"])
    assert unused_keys(bravo, ["training.perceptual_weight", "training.learning_rate"]) == []
    assert unused_keys(bravo, ["training.learning_rate"], sweep=True) == [
        "training.learning_rate=0.01 (medgen-lr-find runs lr_find.num_steps steps at its own learning rates, with no "
        "validation, EMA, checkpoints or resume)"]


def test_evaluation_keys_a_run_does_not_use_are_named():
    from medgen.evaluation.config import unused_keys, validate_evaluate_config

    cfg = validate_evaluate_config(compose_config(["real_dir=r", "synthetic_dir=s", "downstream=false",
                                                   "seg_net_checkpoint=n.pt", "lesions.resamples=10", "budget.steps=5",
                                                   "features.weights_path=w.pth", "spatial_dims=2",
                                                   "features.plane_fraction=0.3"], config_name="evaluate"))
    given = ["budget.steps", "features.plane_fraction", "features.weights_path", "lesions.resamples", "seed"]
    assert [k.split(" ")[0] for k in unused_keys(cfg, given)] == [
        "features.weights_path=w.pth", "features.plane_fraction=0.3", "lesions.resamples=10", "budget.steps=5"]


def test_the_command_line_says_which_keys_it_does_not_use(tmp_path):
    """medgen-evaluate names an unused key before it starts (here it then stops on the empty real_dir)."""
    import subprocess
    import sys

    (tmp_path / "real").mkdir()
    run = subprocess.run([sys.executable, "-m", "medgen.scripts.evaluate", f"real_dir={tmp_path / 'real'}",
                          f"synthetic_dir={tmp_path / 'real'}", f"out_dir={tmp_path / 'out'}",
                          "features.weights_path=w.pth"], capture_output=True, text=True, timeout=120)
    assert ("medgen-evaluate: features.weights_path=w.pth (only features.network=radimagenet reads a weights file) "
            "has no effect in this run") in run.stdout + run.stderr, run.stdout + run.stderr
