"""Size targets of generation (medgen.generation.sizes): quotas by hand, bad requests in one line,
and a run whose output holds exactly the size classes asked for."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from conftest import square_seg_model

from medgen.data.lesions import RANO_BM
from medgen.generation import GenerationError, Stage, generate
from medgen.generation.masks import _walk
from medgen.generation.records import Candidate
from medgen.data.space import SampleSpace
from medgen.generation.requests import CountRequest, GenerateRequest, SizeRequest
from medgen.generation.sizes import Targets, count_classes, hard_to_draw, quotas, resolve_count_target, resolve_target
from medgen.generation.status import read_status

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quotas_share_out_by_the_largest_remainder():
    assert quotas(np.array([1, 1, 1]), 10).tolist() == [4, 3, 3]  # 3.33 each: the earliest bin gets the extra one
    assert quotas(np.array([3, 1]), 5).tolist() == [4, 1]  # 3.75, 1.25
    assert quotas(np.array([0, 2, 1, 1]), 7).tolist() == [0, 3, 2, 2]  # 0, 3.5, 1.75, 1.75: .75 beats .5
    rng = np.random.default_rng(0)
    for _ in range(200):
        w = rng.random(5) * (rng.random(5) > 0.3) + 1e-9
        n = int(rng.integers(1, 500))
        q = quotas(w, n)
        assert q.sum() == n and np.all(np.abs(q - n * w / w.sum()) < 1)


def _slices(mm: float, size: int = 64) -> SampleSpace:
    return SampleSpace((size, size), (mm, mm))


def _cfg(target, bins="rano_bm") -> SizeRequest:
    return SizeRequest(target, bins, guidance=1.0)


def test_presets_and_weights_resolve_to_counts():
    sizes = [5.0, 5.0, 5.0, 12.0, 25.0, 40.0]  # tiny 3, small 1, medium 1, large 1
    real = resolve_target(_cfg("real"), 12, _slices(3.4), sizes)
    assert real.counts.tolist() == [6, 2, 2, 2] and real.source == "real"
    assert resolve_target(_cfg("uniform"), 10, _slices(3.4), None).counts.tolist() == [3, 3, 2, 2]
    weights = resolve_target(_cfg({"tiny": 4, "small": 2}), 9, _slices(3.4), None)
    assert weights.counts.tolist() == [6, 3, 0, 0] and weights.bins == RANO_BM
    finer = resolve_target(_cfg({"<3mm": 1, "3-6mm": 1}, [3, 6, 10]), 4, _slices(1.0), None)
    assert finer.bins.names == ("<3mm", "3-6mm", "6-10mm", ">=10mm") and finer.counts.tolist() == [2, 2, 0, 0]
    assert resolve_target(_cfg("model"), 10, _slices(1.0), None) is None
    # at 64 px of 3.375 mm a tiny lesion (< 10 mm) spans under 3 pixels: warned about; at 128 px (1.69 mm) not
    assert hard_to_draw(real, _slices(3.375)) == ["tiny (< 10 mm)"] and hard_to_draw(real, _slices(1.6875)) == []
    assert hard_to_draw(weights, _slices(3.375)) == ["tiny (< 10 mm)"] and hard_to_draw(weights, _slices(2.4)) == []
    # voxels: the cube edge of the voxel's volume, so the through-plane spacing counts. 2 x 2 x 2 mm: 8 mm across
    # (tiny is < 10 mm: drawable); 2 x 2 x 4: (16)^(1/3) = 2.52 mm, 10.08 mm across: tiny is hard; the x spacing
    # alone (2 mm) would have said drawable
    volumes = SampleSpace((32, 32, 16), (2.0, 2.0, 2.0)), SampleSpace((32, 32, 16), (2.0, 2.0, 4.0))
    assert hard_to_draw(real, volumes[0]) == [] and hard_to_draw(real, volumes[1]) == ["tiny (< 10 mm)"]
    assert hard_to_draw(real, _slices(2.0)) == []


@pytest.mark.parametrize("target, bins, message", [
    ("bigger", "rano_bm", r"lesion_sizes.target=bigger: use model, real, uniform or weights per class"),
    ({"huge": 1}, "rano_bm", r"lesion_sizes.target: unknown class 'huge'; the classes of lesion_sizes.bins are "
                             r"\['tiny'"),
    ({"tiny": 0, "small": 0}, "rano_bm", r"lesion_sizes.target: the weights .* must be >= 0 and sum to a positive"),
    ({"tiny": -1, "small": 2}, "rano_bm", r"must be >= 0"),
    ("uniform", "tiny", r"lesion_sizes.bins: unknown binning 'tiny'; use one of \['rano_bm'\] or a list"),
    ("uniform", [10, 5], r"lesion_sizes.bins: bin edges must be positive, finite and increasing, got \[10.0, 5.0\]"),
    ({"large": 1}, "rano_bm", r"asks for large lesions \(>= 30 mm\) but the masks are 8 px of 2 x 2 mm: no lesion "
                              r"can be longer than their diagonal, 23 mm"),
    ("real", "rano_bm", r"lesion_sizes.target=real: the seg checkpoint records no training lesion sizes"),
])
def test_an_impossible_request_is_one_line_naming_the_key(target, bins, message):
    with pytest.raises(GenerationError, match=message):
        resolve_target(_cfg(target, bins), 10, SampleSpace((8, 8), (2.0, 2.0)), None)


def test_the_walk_accepts_in_order_while_a_class_has_room():
    from medgen.generation.gate import MaskStats

    stats = MaskStats(0.01, 1, 4, 0)
    sizes = [5, 5, 12, 5, 0, 12, 25, 5]  # mm of the largest lesion; 0: no lesion
    ok = [True, True, True, True, True, False, True, True]
    evaluated = {j: Candidate(j, stats, ok[j], largest_mm=float(d)) for j, d in enumerate(sizes)}
    target = resolve_target(_cfg({"tiny": 1, "small": 1, "medium": 1}), 3, _slices(1.0), None)
    walk = _walk(evaluated, Targets(target), 3)
    assert walk.chosen == [0, 2, 6] and walk.prefix == 8
    assert walk.tallies["sizes"].taken.tolist() == [1, 1, 1, 0]
    assert walk.tallies["sizes"].drawn.tolist() == [4, 1, 1, 0]  # 5 fails the gate
    assert _walk(evaluated, Targets(), 10).chosen == [0, 1, 2, 3, 4, 6, 7]
    assert _walk(evaluated, Targets(), 2).chosen == [0, 1]


def test_count_classes_are_named_by_their_counts():
    assert count_classes([1, 2, 3, 4]).names == ("1", "2", "3", "4+")
    classes = count_classes([1, 2, 4])
    assert classes.names == ("1", "2-3", "4+") and classes.index([1, 2, 3, 4, 9]).tolist() == [0, 1, 1, 2, 2]
    assert count_classes([1]).names == ("1+",) and count_classes([1]).index([1, 7]).tolist() == [0, 0]


@pytest.mark.parametrize("classes, message", [
    ([0, 1], r"lesion_counts.classes: must start at 1 and increase, e.g. \[1, 2, 3, 4\] .*got \[0, 1\]"),
    ([1, 3, 2], r"must start at 1 and increase"),
    ([1, 2.5], r"lesion_counts.classes: must be a list of lesion counts, e.g. \[1, 2, 3, 4\], got \[1, 2.5\]"),
    ("1234", r"must be a list of lesion counts"),
])
def test_bad_count_classes_are_one_line(classes, message):
    with pytest.raises(GenerationError, match=message):
        count_classes(classes)


def _count_target(n, recorded, target, classes=(1, 2, 3, 4), most=10):
    return resolve_count_target(CountRequest(target, list(classes)), n, recorded, most)


def test_count_presets_and_weights_resolve_to_quotas():
    # training slices: 1 lesion x3, 2, 3, 5 -> weights 3:1:1:1; 8 masks: 4, 1.33 x3 -> the earliest gets the extra
    real = _count_target(8, [1, 1, 1, 2, 5, 3], "real")
    assert real.counts.tolist() == [4, 2, 1, 1] and (real.key, real.source) == ("lesion_counts", "real")
    weights = _count_target(6, None, {1: 2, "4+": 1})  # a YAML key 1 is an int
    assert weights.counts.tolist() == [4, 0, 0, 2] and weights.describe() == "1 4, 2 0, 3 0, 4+ 2"
    assert _count_target(7, None, "uniform", [1, 2, 4]).counts.tolist() == [3, 2, 2]
    assert _count_target(7, None, "model") is None


def test_count_weights_as_written_on_the_command_line():
    from medgen.core.schema import compose_config
    from medgen.generation.config import validate_generate_config

    cfg = validate_generate_config(compose_config(["image_checkpoint=i", "seg_checkpoint=s", "lesion_counts.classes=[1,2,3]",
                                                   "lesion_counts.target={1:2,2:1,3+:1}"], config_name="generate"))
    assert resolve_count_target(GenerateRequest.from_config(cfg).masks.counts, 8, None, 10).counts.tolist() == [4, 2, 2]


@pytest.mark.parametrize("target, most, message", [
    ("many", 10, r"lesion_counts.target=many: use model, real, uniform or weights per class, e.g. "
                 r"\{1: 1, 2: 1, 3: 1, 4\+: 1\}"),
    ({5: 1}, 10, r"lesion_counts.target: unknown class '5'; the classes of lesion_counts.classes are "
                 r"\['1', '2', '3', '4\+'\]"),
    ({"1": 0}, 10, r"lesion_counts.target: the weights .* must be >= 0 and sum to a positive number"),
    ({"1": 1, "4+": 1}, 3, r"lesion_counts.target asks for masks of 4\+ lesions but the gate rejects masks of more "
                           r"than gate.max_components=3"),
    ("real", 10, r"lesion_counts.target=real: the seg checkpoint records no training lesion counts"),
])
def test_an_impossible_count_request_is_one_line_naming_the_key(target, most, message):
    with pytest.raises(GenerationError, match=message):
        _count_target(10, None, target, most=most)


def test_the_walk_accepts_a_candidate_only_while_its_size_and_its_count_class_have_room():
    from medgen.generation.gate import MaskStats

    # (largest lesion mm, lesions): tiny/1 taken; small/1 (count 1 full); tiny/2 (tiny full); small/2 taken
    drawn = [(5.0, 1), (12.0, 1), (5.0, 2), (12.0, 2), (12.0, 1)]
    evaluated = {j: Candidate(j, MaskStats(0.01, n, 4, 0), True, largest_mm=d) for j, (d, n) in enumerate(drawn)}
    sizes = resolve_target(_cfg({"tiny": 1, "small": 1}), 2, _slices(1.0), None)
    counts = _count_target(2, None, {1: 1, 2: 1})
    walk = _walk(evaluated, Targets(sizes, counts), 2)
    assert walk.chosen == [0, 3]
    assert walk.tallies["sizes"].drawn.tolist() == [2, 3, 0, 0] and walk.tallies["sizes"].taken.tolist() == [1, 1, 0, 0]
    assert walk.tallies["counts"].drawn.tolist() == [3, 2, 0, 0] and walk.tallies["counts"].taken.tolist() == [1, 1, 0, 0]
    assert _walk(evaluated, Targets(counts=counts), 2).chosen == [0, 2]  # counts alone: the first 1 and the first 2


def test_each_candidate_is_asked_for_one_class_in_an_even_spread_of_the_quotas():
    target = resolve_target(_cfg({"tiny": 2, "small": 1, "medium": 1}), 4, _slices(1.0), None)
    assert target.counts.tolist() == [2, 1, 1, 0]
    # slots at (k + 1/2) / count: tiny 0.25 and 0.75, small 0.5, medium 0.5; ties by bin
    assert target.requested(range(9)).tolist() == [0, 1, 2, 0, 0, 1, 2, 0, 0]
    big = resolve_target(_cfg({"tiny": 5, "small": 3, "medium": 1, "large": 1}), 97, _slices(1.0), None)
    for start in (0, 13, 500):  # any num_images consecutive candidates ask for each class its quota
        asked = big.requested(range(start, start + 97))
        assert np.bincount(asked, minlength=4).tolist() == big.counts.tolist()


def test_the_output_holds_exactly_the_size_classes_asked_for(tmp_path, tiny_checkpoints, monkeypatch):
    # 2 mm pixels: a k x k square measures 2.83 k mm; 2 -> tiny (5.7), 5 -> small (14.1), 9 -> medium (25.5)
    square_seg_model(monkeypatch, [2, 2, 2, 5, 9, 2])
    gate = {"enabled": True, "min_area": 0.0, "max_area": 1.0, "inside_brain": True}
    settings = dict(seg_checkpoint=str(tiny_checkpoints["seg"]), image_checkpoint=str(tiny_checkpoints["bravo"]),
                    num_images=6, batch_size=4, steps=2, precision="fp32", gate=gate, progress=False,
                    cache_dir=str(tmp_path / "cache"), lesion_counts={"target": "model"})
    result = generate(out_dir=str(tmp_path / "out"), lesion_sizes={"target": {"tiny": 1, "small": 1, "medium": 1}},
                      **settings)
    with open(result.out_dir / "manifest.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["id"]]
    assert sorted(r["lesion_bins"] for r in rows) == ["medium", "medium", "small", "small", "tiny", "tiny"]
    report = json.loads((result.out_dir / "lesion_sizes.json").read_text())
    assert report["requested"] == report["output"] == {"tiny": 2, "small": 2, "medium": 2, "large": 0}
    # candidates 0..10 were drawn to fill the medium quota (every 6th is one): 7 tiny, 2 small, 2 medium
    assert report["candidates"] == 11 and report["before_gate"] == {"tiny": 7, "small": 2, "medium": 2, "large": 0}
    assert report["acceptance_rate"] == pytest.approx(6 / 11) == result.acceptance_rate
    assert report["before_gate_match"] == pytest.approx(2 / 11 + 2 / 11 + 1 / 3)
    # candidate j is asked for [tiny, small, medium][j % 3]; the unconditional stand-in hits it by chance (j = 0, 6)
    assert report["conditioned"] is False and report["exact_match"] == pytest.approx(2 / 11)
    assert report["asked"] == {"tiny": 4, "small": 4, "medium": 3, "large": 0}
    assert report["exact_match_per_bin"] == {"tiny": 0.5, "small": 0.0, "medium": 0.0, "large": None}
    # the tiny model's training slices hold its "real" distribution; the checkpoint records it
    from medgen.core.checkpoint import load_checkpoint

    assert len(load_checkpoint(tiny_checkpoints["seg"])["lesion_sizes"]) > 0
    # a class the model never draws: one line with the acceptance per class, and the folder says unfinished
    with pytest.raises(GenerationError, match=r"accepted 3 of 12 generated masks .* gate.max_attempts=12; .*; by size "
                                              r"class .* tiny 2/2 \(10 drawn\), small 1/1 \(2 drawn\), medium 0/1 "
                                              r"\(0 drawn\)"):
        square_seg_model(monkeypatch, [2, 2, 2, 5, 2, 2])
        generate(out_dir=str(tmp_path / "never"), **{**settings, "num_images": 4,
                 "gate": {**gate, "max_attempts": 12}}, lesion_sizes={"target": {"tiny": 2, "small": 1, "medium": 1}})
    status = read_status(tmp_path / "never")
    assert not status.complete and not (tmp_path / "never" / "train").exists()


def test_the_output_holds_exactly_the_lesion_counts_asked_for(tmp_path, tiny_checkpoints, monkeypatch):
    from medgen.core.checkpoint import load_checkpoint

    real_sample = Stage.sample
    lesions, drawn = [1, 1, 1, 2, 3], [0]  # candidate j draws lesions[j % 5] separate 2 x 2 squares

    def sample(self, cond, generators, **kwargs):
        if not self.mode.generates_mask:
            return real_sample(self, cond, generators, **kwargs)
        x0 = -torch.ones(len(generators), 2, self.space.size, self.space.size)
        x0[:, 1, 1:-1, 1:-1] = 1
        for b in range(len(generators)):
            for k in range(lesions[(drawn[0] + b) % len(lesions)]):
                x0[b, 0, 2:4, 2 + 4 * k:4 + 4 * k] = 1
        drawn[0] += len(generators)
        return x0

    monkeypatch.setattr(Stage, "sample", sample)
    gate = {"enabled": True, "min_area": 0.0, "max_area": 1.0, "inside_brain": True, "max_attempts": 20}
    settings = dict(seg_checkpoint=str(tiny_checkpoints["seg"]), image_checkpoint=str(tiny_checkpoints["bravo"]),
                    num_images=3, batch_size=2, steps=2, precision="fp32", gate=gate, progress=False,
                    cache_dir=str(tmp_path / "cache"), lesion_sizes={"target": "model"})
    result = generate(out_dir=str(tmp_path / "out"), lesion_counts={"target": {1: 1, 2: 1, "3+": 1},
                                                                      "classes": [1, 2, 3]}, **settings)
    with open(result.out_dir / "manifest.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["id"]]
    assert sorted(int(r["components"]) for r in rows) == [1, 2, 3]
    report = json.loads((result.out_dir / "lesion_sizes.json").read_text())
    counts = report["counts"]
    assert counts["requested"] == counts["output"] == {"1": 1, "2": 1, "3+": 1} and counts["target"] == "weights"
    # candidates 0..4: the first single lesion is taken, the next two are not, then the 2 and the 3
    assert report["candidates"] == 5 and counts["before_gate"] == {"1": 3, "2": 1, "3+": 1}
    assert report["acceptance_rate"] == pytest.approx(3 / 5) and "exact_match" not in report  # sizes not targeted
    # the mask model records the lesion count of each training slice with a lesion, beside its largest lesion
    ckpt = load_checkpoint(tiny_checkpoints["seg"])
    assert len(ckpt["lesion_counts"]) == len(ckpt["lesion_sizes"]) > 0 and min(ckpt["lesion_counts"]) >= 1
    # a class the model never draws: one line with the acceptance per count class
    lesions[:] = [1, 2]
    with pytest.raises(GenerationError, match=r"accepted 2 of 20 generated masks .* by count class \(lesion_counts"
                                              r".target=uniform\), accepted/wanted: 1 1/1 \(10 drawn\), 2 1/1 "
                                              r"\(10 drawn\), 3\+ 0/1 \(0 drawn\)"):
        generate(out_dir=str(tmp_path / "never"), lesion_counts={"target": "uniform", "classes": [1, 2, 3]},
                 **settings)


def _class_square_model(monkeypatch, calls):
    """A stand-in for a size-conditioned seg model: it draws one square lesion of the class its
    condition planes ask for (none: 2 px), and records the guidance scale."""
    sides = {1: 2, 2: 5, 3: 9, 4: 12}  # 2 mm pixels: tiny, small, medium, large
    real_sample = Stage.sample

    def sample(self, cond, generators, *, guidance_scale=1.0, **kwargs):
        if not self.mode.generates_mask:  # the image model
            return real_sample(self, cond, generators, guidance_scale=guidance_scale, **kwargs)
        calls.append((cond, guidance_scale))
        n, size = len(generators), self.space.size
        x0 = -torch.ones(n, 2, size, size)
        x0[:, 1, 1:size - 1, 1:size - 1] = 1
        for b in range(n):
            k = sides.get(int(cond[b, :, 0, 0].argmax()) if (cond[b] > 0).any() else 1, 2)
            x0[b, 0, 2:2 + k, 2:2 + k] = 1
        return x0

    monkeypatch.setattr(Stage, "sample", sample)


def _train_seg(tmp_path, tiny_data, *overrides):
    """A seg model trained for a few steps with ``overrides``; returns the trainer and its first batch."""
    from medgen.core.distributed import DistInfo
    from medgen.diffusion.config import load_config
    from medgen.diffusion.trainer import DiffusionTrainer
    from tests.conftest import tiny_overrides

    cfg = load_config(tiny_overrides(tmp_path, tiny_data, "mode=seg", *overrides))
    trainer = DiffusionTrainer(cfg, tmp_path / "seg", DistInfo(device=torch.device("cpu")), progress=False)
    batch = next(iter(trainer.data.train))
    trainer.train()
    return trainer, batch


def test_a_size_conditioned_seg_model_trains_and_draws_the_class_asked_of_each_candidate(
        tmp_path, tiny_data, tiny_checkpoints, monkeypatch):
    from medgen.generation.models import load_stage

    _, batch = _train_seg(tmp_path, tiny_data, "strategy=ddpm", "mode.size_bins=rano_bm", "training.cond_dropout=0.2",
                          "training.max_steps=3")
    assert batch["lesion_mm"].shape == (4, 1) and torch.all(batch["lesion_mm"] > 0)  # lesion slices
    ckpt = tmp_path / "seg" / "checkpoints" / "latest.pt"
    stage = load_stage(ckpt, "seg", "seg_checkpoint", device=torch.device("cpu"), compile="false")
    assert stage.mode.lesion_conditioned and stage.network.conv_in.conv.in_channels == 7  # 2 channels + 5 planes
    # the real network samples with a condition (shapes only: 3 training steps)
    cond = stage.mode.lesion_condition((stage.space.size,) * 2, torch.tensor([1, 2]))
    x0 = stage.sample(cond, [torch.Generator().manual_seed(i) for i in range(2)], steps=2, sampler="ddim",
                      guidance_scale=2.0)
    assert x0.shape == (2, 2, stage.space.size, stage.space.size) and torch.isfinite(x0).all()

    calls = []
    _class_square_model(monkeypatch, calls)
    gate = {"enabled": True, "min_area": 0.0, "max_area": 1.0, "inside_brain": True}
    settings = dict(seg_checkpoint=str(ckpt), image_checkpoint=str(tiny_checkpoints["bravo"]), num_images=6,
                    batch_size=4, steps=2, precision="fp32", gate=gate, progress=False, cache_dir=str(tmp_path / "c"),
                    lesion_counts={"target": "model"})
    result = generate(out_dir=str(tmp_path / "out"), lesion_sizes={"target": "uniform", "guidance": 2.0}, **settings)
    report = json.loads((result.out_dir / "lesion_sizes.json").read_text())
    assert report["requested"] == report["output"] == {"tiny": 2, "small": 2, "medium": 1, "large": 1}
    assert report["conditioned"] is True and report["guidance"] == 2.0
    assert report["exact_match"] == 1.0 and report["candidates"] == 6 and report["acceptance_rate"] == 1.0
    assert all(g == 2.0 for _, g in calls)
    # the classes asked of candidates 0..7 (two batches of 4), as planes: tiny, small, medium, large, ...
    asked = torch.cat([c[:, :, 0, 0].argmax(1) for c, _ in calls]).tolist()
    assert asked == [1, 2, 3, 4, 1, 2, 1, 2]
    # without a target the model draws with no class given (every plane -1), unguided
    calls.clear()
    generate(out_dir=str(tmp_path / "free"), lesion_sizes={"target": "model"}, **settings)
    assert all(torch.all(c == -1) and g == 1.0 for c, g in calls)


def test_a_count_conditioned_seg_model_trains_and_draws_the_number_of_lesions_asked(
        tmp_path, tiny_data, tiny_checkpoints, monkeypatch):
    trainer, batch = _train_seg(tmp_path, tiny_data, "strategy=rflow", "mode.count_classes=[1,2,3]",
                                "training.cond_dropout=0.1", "training.max_steps=2")
    assert batch["lesion_count"].shape == (4, 1) and torch.all(batch["lesion_count"] >= 1)
    assert trainer.model.conv_in.conv.in_channels == 2 + 4  # [seg, brain] + none, 1, 2, 3+

    real_sample, calls = Stage.sample, []

    def sample(self, cond, generators, *, guidance_scale=1.0, **kwargs):  # as many 2 x 2 lesions as asked
        if not self.mode.generates_mask:
            return real_sample(self, cond, generators, guidance_scale=guidance_scale, **kwargs)
        calls.append(guidance_scale)
        x0 = -torch.ones(len(generators), 2, self.space.size, self.space.size)
        x0[:, 1, 1:-1, 1:-1] = 1
        for b in range(len(generators)):
            for k in range(int(cond[b, :, 0, 0].argmax())):
                x0[b, 0, 2:4, 2 + 4 * k:4 + 4 * k] = 1
        return x0

    monkeypatch.setattr(Stage, "sample", sample)
    gate = {"enabled": True, "min_area": 0.0, "max_area": 1.0, "inside_brain": True}
    result = generate(seg_checkpoint=str(tmp_path / "seg"), image_checkpoint=str(tiny_checkpoints["bravo"]),
                      out_dir=str(tmp_path / "out"), num_images=6, batch_size=4, steps=2, precision="fp32", gate=gate,
                      progress=False, cache_dir=str(tmp_path / "c"), lesion_sizes={"target": "model", "guidance": 1.5},
                      lesion_counts={"target": "uniform", "classes": [1, 2, 3]})
    report = json.loads((result.out_dir / "lesion_sizes.json").read_text())
    counts = report["counts"]
    assert counts["requested"] == counts["output"] == {"1": 2, "2": 2, "3+": 2}
    assert counts["conditioned"] is True and counts["exact_match"] == 1.0 and report["guidance"] == 1.5
    assert report["candidates"] == 6 and calls == [1.5, 1.5]
    with open(result.out_dir / "manifest.csv") as f:
        assert sorted(int(r["components"]) for r in csv.DictReader(f) if r["id"]) == [1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize("size_bins, count_classes, dropout, sizes, counts, message", [
    (None, None, 0.0, {"target": "uniform", "guidance": 3.0}, None,
     r"lesion_sizes.guidance=3: seg_checkpoint .* is not conditioned on lesion sizes or counts"),
    ("rano_bm", None, 0.1, {"target": "uniform", "bins": [3, 6]}, None,
     r"lesion_sizes.bins gives \['<3mm', '3-6mm', '>=6mm'\] but seg_checkpoint .* is conditioned on \['tiny'"),
    ("rano_bm", None, 0.0, {"target": "uniform", "guidance": 2.0}, None,
     r"trained with training.cond_dropout=0, so its masks cannot be guided"),
    ("rano_bm", None, 0.0, {"target": "model"}, None, r"cannot be drawn without a class \(lesion_sizes.target=model"),
    (None, [1, 2, 3, 4], 0.1, {"target": "model"}, {"target": "uniform", "classes": [1, 2]},
     r"lesion_counts.classes gives \['1', '2\+'\] but seg_checkpoint .* is conditioned on \['1', '2', '3', '4\+'\] "
     r"\(mode.count_classes\)"),
    ("rano_bm", [1, 2, 3, 4], 0.1, {"target": "uniform"}, {"target": "model"},
     r"conditioned on lesion sizes and counts \(mode.size_bins, mode.count_classes\): set lesion_sizes.target and "
     r"lesion_counts.target both to a target \(not model\), or both to model"),
])
def test_a_request_the_conditioned_model_cannot_serve_is_one_line(size_bins, count_classes, dropout, sizes, counts,
                                                                  message):
    from types import SimpleNamespace

    from medgen.data.lesions import parse_count_classes
    from medgen.generation.sizes import check_conditioning

    mode = SimpleNamespace(size_bins=None if size_bins is None else RANO_BM,
                           count_classes=None if count_classes is None else parse_count_classes(count_classes))
    counts = counts or {"target": "model"}
    targets = Targets(resolve_target(_cfg(sizes["target"], sizes.get("bins", "rano_bm")), 4, _slices(1.0), None),
                      _count_target(4, None, counts["target"], counts.get("classes", [1, 2, 3, 4])))
    with pytest.raises(GenerationError, match=message):
        check_conditioning(mode, "seg.pt", dropout, targets, sizes.get("guidance", 1.0))
    fitting = Targets(resolve_target(_cfg("uniform"), 4, _slices(1.0), None) if size_bins else None,
                      _count_target(4, None, "uniform") if count_classes else None)
    check_conditioning(mode, "seg.pt", 0.1, fitting, 1.0)  # a fitting request passes
