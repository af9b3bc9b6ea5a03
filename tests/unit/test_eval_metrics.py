"""Evaluation metrics against closed forms and hand-built cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medgen.evaluation import metrics
from medgen.data.space import SampleSpace
from medgen.evaluation.downstream import dice_per_item, size_bin, summarise_dice

SLICES = SampleSpace((20, 20))
from medgen.evaluation.features import fid, frechet_distance, kid


def test_frechet_distance_of_gaussians_in_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    a, b = rng.uniform(0.5, 2, 4), rng.uniform(0.5, 2, 4)
    # diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # a rotated (non-diagonal) pair: the trace term is rotation-invariant when both rotate together
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    assert frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T) == pytest.approx(expected, rel=1e-8)
    # general position: tr(S1 + S2 - 2 (S1 S2)^1/2) against the eigenvalues of S1 S2
    m1, m2 = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    s1, s2 = m1 @ m1.T + np.eye(4), m2 @ m2.T + np.eye(4)
    trace_sqrt = np.sum(np.sqrt(np.linalg.eigvals(s1 @ s2).real))
    assert frechet_distance(mu1, s1, mu1, s2) == pytest.approx(np.trace(s1 + s2) - 2 * trace_sqrt, rel=1e-8)


def test_fid_from_samples_converges_to_the_closed_form_and_is_zero_for_a_set_with_itself():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, size=(20000, 3))
    y = rng.normal(0.5, 2, size=(20000, 3))
    assert fid(x, x) == pytest.approx(0, abs=1e-8)
    assert fid(x, y) == pytest.approx(3 * 0.25 + 3 * (1 - 2) ** 2, rel=0.03)


def test_kid_is_unbiased_and_orders_shifts():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    same, same_std = kid(a, b, subsets=50, subset_size=200)
    assert abs(same) < 3 * same_std + 1e-3  # unbiased: about 0 for one distribution
    small = kid(a, b + 0.3, subsets=50, subset_size=200)[0]
    large = kid(a, b + 1.0, subsets=50, subset_size=200)[0]
    assert same < small < large
    with pytest.raises(ValueError, match="at least 2"):
        kid(a[:1], b)


def _masks() -> np.ndarray:
    m = np.zeros((3, 20, 20), np.uint8)
    m[0, 2:6, 2:6] = 1  # one 16-px lesion
    m[1, 2:4, 2:4] = 1
    m[1, 10:13, 10:13] = 1  # two lesions: 4 + 9 px
    return m  # slice 2 empty


def test_mask_statistics_by_hand():
    s = metrics.mask_statistics(_masks(), SLICES)
    assert s["lesions"].tolist() == [1, 2, 0]
    np.testing.assert_allclose(s["area"], [16 / 400, 13 / 400, 0])
    np.testing.assert_allclose(sorted(s["component_size"]), sorted([16 / 400, 4 / 400, 9 / 400]))
    c = metrics.compare_masks(_masks(), _masks()[:2], SLICES)
    # lesions per slice {0, 1, 2} against {1, 2}: |F - G| is 1/3 on [0, 1) and 1/6 on [1, 2)
    assert c["lesions"]["wasserstein"] == pytest.approx(1 / 3 + 1 / 6)
    assert c["empty_fraction"] == {"real": pytest.approx(1 / 3), "synthetic": 0.0}
    assert c["lesions"]["ks"] == pytest.approx(1 / 3)  # CDFs differ by 1/3 at 0 lesions


def test_lesion_contrast_by_hand():
    image = np.zeros((9, 9), np.float32)
    image[4, 4] = 1.0  # the lesion pixel
    image[4, 5] = 0.8  # a neighbour of it, inside every ring
    mask = np.zeros((9, 9))
    mask[4, 4] = 1
    mask[0, 0] = 0.5  # exactly 0.5 is no lesion
    # the ring of a one-pixel lesion after one dilation (a cross): its 4 neighbours, one of them 0.8
    assert metrics.lesion_contrast(image, mask, ring=1) == pytest.approx(1.0 - 0.8 / 4)
    # two dilations: the 12 pixels of a diamond of radius 2 around it
    assert metrics.lesion_contrast(image, mask, ring=2) == pytest.approx(1.0 - 0.8 / 12)


def test_distribution_distance_by_hand():
    d = metrics.distribution_distance(np.array([0.0, 1.0]), np.array([1.0, 2.0]))
    assert d == {"wasserstein": pytest.approx(1.0), "ks": pytest.approx(0.5)}


def test_dice_and_size_bins_by_hand():
    target = _masks()[:2]
    pred = target.copy()
    pred[1, 10:13, 10:13] = 0  # misses the 9-px lesion of slice 1: Dice 2*4/(4+13)
    dice = dice_per_item(pred, target)
    np.testing.assert_allclose(dice, [1.0, 8 / 17])
    assert dice_per_item(np.zeros_like(target), target).tolist() == [0.0, 0.0]  # an empty prediction scores 0
    big = np.zeros((1, 20, 20), np.uint8)
    big[0, :10, :10] = 1  # 25% of the slice
    assert size_bin(np.concatenate([target, big, np.zeros((1, 20, 20))]), SLICES).tolist() == ["large", "large", "large", "small"]
    summary = summarise_dice(dice, np.array(["small", "large"]))
    assert summary["overall"] == pytest.approx((1 + 8 / 17) / 2) and summary["small"] == 1.0
    assert np.isnan(summary["medium"]) and summary["n_medium"] == 0


def test_diversity_and_paired_fidelity():
    rng = np.random.default_rng(3)
    images = rng.random((6, 64, 64)).astype(np.float32)
    identical = np.repeat(images[:1], 6, axis=0)
    space = SampleSpace((64, 64))
    assert metrics.pairwise_ms_ssim(identical, space, 20, 0) == pytest.approx(1.0, abs=1e-5)
    assert metrics.pairwise_ms_ssim(images, space, 20, 0) < 0.5
    paired = metrics.paired_fidelity(images, images, space)
    assert paired["ssim"] == pytest.approx(1.0, abs=1e-5) and paired["psnr"] > 80
    noisy = metrics.paired_fidelity(images, np.clip(images + 0.1, 0, 1), space)
    assert 15 < noisy["psnr"] < 25


class _FixedPrediction(torch.nn.Module):
    """A "segmenter" whose logits are given per image: +10 where ``marks`` is 1, -10 elsewhere."""

    def __init__(self, marks: np.ndarray):
        super().__init__()
        self.marks = torch.from_numpy(marks.astype(np.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = x[:, 0, 0, 0].round().long()  # each image carries its own index in pixel (0, 0)
        return (self.marks[index] * 20 - 10)[:, None]


def test_adherence_scores_lesion_slices_by_dice_and_lesion_free_ones_by_false_positives():
    from medgen.evaluation.downstream import ItemSet, adherence

    s = 8
    masks = np.zeros((4, s, s), np.uint8)
    masks[0, 2:4, 2:4] = 1  # 4 lesion pixels
    masks[1, 5:7, 5:7] = 1
    marks = np.zeros((4, s, s), np.uint8)
    marks[0, 2:4, 2:3] = 1  # half of slice 0's lesion: Dice 2*2 / (2 + 4) = 2/3
    marks[1, 0, 1] = 1  # slice 1: a false pixel, the lesion missed: Dice 0
    marks[3, 1:3, 1:3] = 1  # lesion-free slice 3: 4 false pixels; lesion-free slice 2: nothing
    images = np.zeros((4, 1, s, s), np.float32)
    images[:, 0, 0, 0] = np.arange(4)
    syn = ItemSet(images, masks)
    real = ItemSet(images[:2], masks[:2])
    a = adherence(_FixedPrediction(marks), syn, real, SampleSpace((s, s)), torch.device("cpu"))
    assert a["lesion_items"] == 2 and a["empty_items"] == 2
    assert a["synthetic_dice"] == pytest.approx((2 / 3 + 0) / 2)  # over the lesion slices only
    assert a["false_positive_fraction"] == pytest.approx(0.5)  # one of the two lesion-free slices
    assert a["false_positive_area"] == pytest.approx(4 / (2 * s * s))
    assert a["real_test_dice"] == pytest.approx(1 / 3)
    # a set without lesions: no Dice at all (not the 0 or 1 an empty mask would give), false positives only
    none = adherence(_FixedPrediction(marks), ItemSet(images[2:], masks[2:]), real, SampleSpace((s, s)),
                     torch.device("cpu"))
    assert none["synthetic_dice"] is None and none["lesion_items"] == 0 and none["false_positive_fraction"] == 0.5


def test_every_skipped_metric_is_listed_with_where_it_was():
    from medgen.evaluation.report import skipped_metrics

    result = {"features": {"skipped": "FID/KID needs at least 2 slices per set (synthetic 1)"},
              "distribution": {"diversity": {"bravo": {"synthetic_ms_ssim": None, "skipped": "too few"}}},
              "adherence": {"synthetic_dice": 0.5}}
    assert skipped_metrics(result) == [("features", "FID/KID needs at least 2 slices per set (synthetic 1)"),
                                       ("distribution.diversity.bravo", "too few")]


def _discs(n: int, s: int, rng: np.random.Generator):
    """``n`` noisy slices with one bright disc each (radius 3 to 6) and the disc as the mask."""
    yy, xx = np.mgrid[:s, :s]
    images, masks = rng.normal(0.2, 0.05, (n, 1, s, s)).astype(np.float32), np.zeros((n, s, s), np.uint8)
    for i in range(n):
        r, (cy, cx) = rng.integers(3, 7), rng.integers(7, s - 7, 2)
        masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        images[i, 0][masks[i] == 1] += 0.6
    return images, masks


def test_budget_precision_bf16_trains_the_segmenter_in_bf16_to_the_same_skill(monkeypatch):
    from medgen.core import precision
    from medgen.evaluation import downstream
    from medgen.evaluation.config import BudgetConfig
    from medgen.evaluation.downstream import ItemSet, predict, train_segmenter

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)  # the choice, not this CPU's
    dtypes: dict[str, set] = {}
    build = downstream.build_segmenter

    def watched(in_channels, space=None):
        net = build(in_channels, space)
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.register_forward_hook(lambda _m, _i, out: dtypes[current].add(out.dtype) if net.training else None)
        return net

    monkeypatch.setattr(downstream, "build_segmenter", watched)
    rng = np.random.default_rng(0)
    train, test = ItemSet(*_discs(48, 32, rng)), ItemSet(*_discs(16, 32, rng))
    dice = {}
    for current in ("fp32", "bf16"):
        dtypes[current] = set()
        net = train_segmenter(train, BudgetConfig(steps=80, batch_size=8, learning_rate=3e-3, precision=current),
                              SampleSpace((32, 32)), seed=0, device=torch.device("cpu"), progress=False)
        assert all(p.dtype == torch.float32 for p in net.parameters())  # autocast: the weights stay fp32
        dice[current] = dice_per_item(predict(net, test.images, SampleSpace((32, 32)), torch.device("cpu")), test.masks).mean()
    assert dtypes == {"fp32": {torch.float32}, "bf16": {torch.bfloat16}}
    assert dice["fp32"] > 0.7 and dice["bf16"] > 0.7 and abs(dice["fp32"] - dice["bf16"]) < 0.15, dice


def test_budget_precision_is_fp32_or_bf16():
    from medgen.core.schema import ConfigError
    from medgen.evaluation.config import evaluate_config

    base = {"real_dir": "r", "synthetic_dir": "s"}
    assert evaluate_config(base).budget.precision == "fp32"
    with pytest.raises(ConfigError, match="budget.precision"):
        evaluate_config({**base, "budget": {"precision": "fp16"}})
