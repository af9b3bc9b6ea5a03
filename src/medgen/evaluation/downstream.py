"""What a synthetic set does for a segmentation model: downstream training and conditioning adherence.

The segmentation network is MONAI's ``DynUNet`` (4 levels, 16-128 filters, instance norm,
residual blocks), one sigmoid output, trained with MONAI's ``DiceCELoss`` and AdamW for a fixed
budget of steps on batches drawn with replacement, with random flips. Dice is MONAI's
``DiceMetric`` per slice on the prediction thresholded at 0.5. The same code serves a 3D set
(``ItemSet`` of volumes ``[N, C, X, Y, Z]``): the network is then the 3D ``DynUNet`` (its three
downsamplings need every axis a multiple of 8), a batch holds whole volumes, flips are along all
three axes, Dice is per volume and lesion sizes are binned by volume fraction (:data:`SIZE_BINS_3D`).

* Downstream: the same network and budget trained on (a) real, (b) real + synthetic and (c)
  synthetic only, once per seed; Dice on the real test lesion slices, overall and by lesion-area
  bin, and lesion by lesion on the whole real test split (:mod:`medgen.evaluation.lesionwise`:
  sensitivity, false positives and lesion Dice per Feret-diameter bin).
* Conditioning adherence: a network trained on real data segments the synthetic images. On slices
  whose mask has a lesion: its Dice against the mask, beside its Dice on real test images. On
  lesion-free slices Dice says nothing (an empty prediction of an empty mask is 1 by convention,
  any false pixel makes it 0), so they are measured by false positives instead: the fraction of
  them where the network finds a lesion, and the mean area it marks.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.nets import DynUNet
from tqdm.auto import tqdm

from medgen.core.precision import autocast
from medgen.data.masks import is_lesion
from medgen.data.space import SampleSpace
from medgen.evaluation.config import BudgetConfig
from medgen.evaluation.lesionwise import LesionTest, over_seeds

log = logging.getLogger("medgen.evaluate")

#: lesion-size bins by lesion area (fraction of the image): upper edges; the last bin is open
SIZE_BINS: tuple[tuple[str, float], ...] = (("small", 0.002), ("medium", 0.01), ("large", math.inf))
#: the same bins for volumes, by lesion volume (fraction of the head's bounding box): in a box of
#: about 7 l, 1e-4 is one sphere of about 11 mm diameter and 1e-3 one of about 24 mm
SIZE_BINS_3D: tuple[tuple[str, float], ...] = (("small", 1e-4), ("medium", 1e-3), ("large", math.inf))
#: the strides of the segmenter's levels: every axis of its input must be a multiple of their product
STRIDES = (1, 2, 2, 2)
SETS = ("real", "real+synthetic", "synthetic")


@dataclass
class ItemSet:
    """Slices in memory: ``images [N, C, S, S]`` float32 in [0, 1], ``masks [N, S, S]`` in {0, 1};
    or volumes: ``images [N, C, X, Y, Z]``, ``masks [N, X, Y, Z]``."""

    images: np.ndarray
    masks: np.ndarray

    def __len__(self) -> int:
        return len(self.masks)

    @staticmethod
    def concat(a: "ItemSet", b: "ItemSet") -> "ItemSet":
        return ItemSet(np.concatenate([a.images, b.images]), np.concatenate([a.masks, b.masks]))


def build_segmenter(in_channels: int, space: SampleSpace) -> DynUNet:
    """The segmentation network for the samples of ``space``: the network builder, the one place
    besides the space that needs the number of dimensions."""
    dims = space.dims
    return DynUNet(spatial_dims=dims, in_channels=in_channels, out_channels=1, kernel_size=[3, 3, 3, 3],
                   strides=list(STRIDES), upsample_kernel_size=[2, 2, 2], filters=[16, 32, 64, 128],
                   norm_name="instance", res_block=True)


def train_segmenter(data: ItemSet, budget: BudgetConfig, space: SampleSpace, *, seed: int, device: torch.device,
                    desc: str = "segmenter", progress: bool = True) -> DynUNet:
    """Train a fresh network on ``data`` (samples of ``space``) with ``budget``, passed whole: a validated config's
    ``budget`` node or a :class:`~medgen.evaluation.config.BudgetConfig` (``steps`` steps of
    ``batch_size``, ``learning_rate``; forward passes in bf16 autocast with ``precision="bf16"``
    where the device computes bf16 natively). Returns the network in eval mode."""
    torch.manual_seed(seed)
    net = build_segmenter(data.images.shape[1], space).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=budget.learning_rate, weight_decay=1e-4)
    loss_fn = DiceCELoss(sigmoid=True)
    rng = np.random.default_rng(seed)
    images, masks = torch.from_numpy(data.images), torch.from_numpy(data.masks.astype(np.float32))[:, None]
    net.train()
    for _ in tqdm(range(budget.steps), desc=desc, unit="step", leave=False, disable=not progress):
        idx = rng.integers(0, len(data), budget.batch_size)
        x, y = images[idx].to(device), masks[idx].to(device)
        for dim in range(2, x.ndim):  # random flips, one decision per batch and axis
            if rng.random() < 0.5:
                x, y = x.flip(dim), y.flip(dim)
        with autocast(device, budget.precision):
            logits = net(x)
        loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return net.eval()


@torch.no_grad()
def predict(net: torch.nn.Module, images: np.ndarray, space: SampleSpace, device: torch.device,
            batch_size: int | None = None) -> np.ndarray:
    """Binary predictions ``[N, S, S]`` for ``images [N, C, S, S]`` (``[N, X, Y, Z]`` for volumes
    ``[N, C, X, Y, Z]``); ``batch_size`` defaults to 32 slices or 2 volumes."""
    batch_size = batch_size or space.either(32, 2)
    out = [is_lesion(torch.sigmoid(net(torch.from_numpy(images[i:i + batch_size]).to(device))))[:, 0].cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy().astype(np.uint8)


def dice_per_item(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """MONAI ``DiceMetric`` of each slice ``[N, S, S]`` or volume ``[N, X, Y, Z]`` (an empty
    prediction of a lesion scores 0)."""
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    p, t = (torch.from_numpy(np.asarray(a, np.float32))[:, None] for a in (pred, target))
    return metric(p, t)[:, 0].numpy().astype(np.float64)


def size_bin(masks: np.ndarray, space: SampleSpace) -> np.ndarray:
    """The :data:`SIZE_BINS` name of each mask ``[N, S, S]`` by its lesion area (of each volume
    ``[N, X, Y, Z]`` by its lesion volume, :data:`SIZE_BINS_3D`)."""
    area = is_lesion(masks).reshape(len(masks), -1).mean(1)
    upper = np.asarray([edge for _, edge in space.either(SIZE_BINS, SIZE_BINS_3D)[:-1]])
    return np.asarray([name for name, _ in SIZE_BINS])[np.searchsorted(upper, area, side="right")]


def summarise_dice(dice: np.ndarray, bins: np.ndarray) -> dict[str, float]:
    """Mean Dice overall and per size bin (NaN for an empty bin), and the slice counts."""
    out = {"overall": float(dice.mean()) if dice.size else math.nan}
    for name, _ in SIZE_BINS:
        sel = bins == name
        out[name] = float(dice[sel].mean()) if sel.any() else math.nan
        out[f"n_{name}"] = int(sel.sum())
    return out


#: a downstream segmenter: ``segment(set name, training items, seed, images)`` trains a fresh network
#: on the items and returns its binary predictions of ``images`` (``[N, S, S]`` or ``[N, X, Y, Z]``)
Segment = Callable[[str, ItemSet, int, np.ndarray], np.ndarray]


def dynunet_segment(space: SampleSpace, budget: BudgetConfig, device: torch.device, progress: bool = True,
                    on_network: Callable[[str, int, DynUNet], None] | None = None) -> Segment:
    """The default :data:`Segment`: :func:`train_segmenter` with ``budget``, then :func:`predict`;
    ``on_network(set, seed, net)`` sees each network."""
    def segment(name: str, data: ItemSet, seed: int, images: np.ndarray) -> np.ndarray:
        net = train_segmenter(data, budget, space, seed=seed, device=device, desc=f"{name} seed {seed}",
                              progress=progress)
        if on_network is not None:
            on_network(name, seed, net)
        return predict(net, images, space, device)
    return segment


def downstream(real_train: ItemSet, synthetic: ItemSet, real_test: ItemSet, space: SampleSpace, *,
               seeds: list[int], budget: BudgetConfig, device: torch.device, progress: bool = True,
               on_network: Callable[[str, int, DynUNet], None] | None = None,
               lesions: LesionTest | None = None, segment: Segment | None = None) -> dict:
    """Train on (a) real, (b) real + synthetic, (c) synthetic per seed, each network with
    ``budget`` (passed whole to :func:`train_segmenter`); Dice on ``real_test``. ``segment``
    replaces the DynUNet (:func:`dynunet_segment`) with another segmenter, e.g. nnU-Net
    (:class:`~medgen.evaluation.nnunet.NnunetSegmenter`); its predictions are scored the same way.

    Returns per set: ``per_seed`` results, ``mean``/``std`` of the overall Dice over seeds and the
    per-bin means; and ``gain`` = mean(b) - mean(a) with ``spread`` = the larger of their seed
    standard deviations and ``gain_exceeds_spread``. ``on_network(set, seed, net)`` sees each net.
    With ``lesions``, each set also gets ``lesions``: the lesion-wise summary of each seed
    (``per_seed``) and their ``mean``/``std`` (:func:`~medgen.evaluation.lesionwise.over_seeds`).
    """
    sets = {"real": real_train, "real+synthetic": ItemSet.concat(real_train, synthetic), "synthetic": synthetic}
    bins = size_bin(real_test.masks, space)
    n = len(real_test)
    # the whole test split begins with real_test's slices (whole_test_split): one prediction serves both
    shared = lesions is not None and len(lesions.images) >= n and np.array_equal(lesions.images[:n], real_test.images)
    images = real_test.images if lesions is None else lesions.images if shared else \
        np.concatenate([lesions.images, real_test.images])
    whole_n = 0 if lesions is None else len(lesions.images)
    segment = segment or dynunet_segment(space, budget, device, progress, on_network)
    results: dict = {}
    for name, data in sets.items():
        per_seed, per_seed_lesions = [], []
        for seed in seeds:
            pred = segment(name, data, seed, images)
            whole = pred[:whole_n] if lesions is not None else None
            dice = dice_per_item(pred[:n] if lesions is None or shared else pred[whole_n:], real_test.masks)
            per_seed.append({"seed": seed, **summarise_dice(dice, bins)})
            if lesions is not None:
                per_seed_lesions.append({"seed": seed, **lesions.score(whole, seed)})
        overall = np.asarray([r["overall"] for r in per_seed])
        results[name] = {"train_items": len(data), "per_seed": per_seed, "mean": float(overall.mean()),
                         "std": float(overall.std(ddof=1)) if len(overall) > 1 else 0.0,
                         "bins": {b: float(np.nanmean([r[b] for r in per_seed])) if any(r[f"n_{b}"] for r in per_seed)
                                  else math.nan for b, _ in SIZE_BINS}}
        if lesions is not None:
            results[name]["lesions"] = {"per_seed": per_seed_lesions, **over_seeds(per_seed_lesions)}
        log.info("downstream %-15s Dice %.3f ± %.3f (%d seeds)", name, results[name]["mean"], results[name]["std"],
                 len(seeds))
    gain = results["real+synthetic"]["mean"] - results["real"]["mean"]
    spread = max(results["real"]["std"], results["real+synthetic"]["std"])
    verdict = ("cannot be judged from one seed (there is no seed-to-seed spread to compare the difference with)"
               if len(seeds) < 2 else
               "helps: the gain is larger than the seed-to-seed spread" if gain > spread else
               "hurts: the loss is larger than the seed-to-seed spread" if gain < -spread else
               "has no clear effect: the difference is within the seed-to-seed spread")
    results["gain"] = {"value": gain, "spread": spread, "gain_exceeds_spread": bool(gain > spread and len(seeds) > 1),
                       "verdict": f"adding the synthetic set {verdict}"}
    return results


def adherence(net: torch.nn.Module, synthetic: ItemSet, real_test: ItemSet, space: SampleSpace,
              device: torch.device) -> dict:
    """How a real-trained network reads the synthetic images (see the module docstring): Dice on
    the slices with a lesion (None when there are none), false positives on the lesion-free ones
    (None when there are none), and its Dice on real test images as the reference level."""
    pred = predict(net, synthetic.images, space, device)
    has_lesion = synthetic.masks.reshape(len(synthetic), -1).any(axis=1)
    empty = ~has_lesion
    real = dice_per_item(predict(net, real_test.images, space, device), real_test.masks)
    out = {"synthetic_dice": float(dice_per_item(pred[has_lesion], synthetic.masks[has_lesion]).mean())
           if has_lesion.any() else None,
           "lesion_items": int(has_lesion.sum()), "empty_items": int(empty.sum()),
           "false_positive_fraction": float(pred[empty].reshape(int(empty.sum()), -1).any(axis=1).mean())
           if empty.any() else None,
           "false_positive_area": float(pred[empty].mean()) if empty.any() else None,
           "real_test_dice": float(real.mean()), "synthetic_items": len(synthetic), "real_test_items": len(real_test)}
    if not has_lesion.any():
        log.warning("adherence: no synthetic mask has a lesion, so there is no Dice to report; the %d lesion-free "
                    "slices are scored by false positives only", len(synthetic))
    return out


def _size_text(space: SampleSpace) -> str:
    return space.either(f"{space.shape[0]} px", "x".join(map(str, space.shape)) + " voxels")


def save_segmenter(net: DynUNet, path: Path, image_keys: list[str], space: SampleSpace) -> Path:
    """``net`` with what it segments: ``image_keys`` at ``space`` (its ``state_dict``)."""
    torch.save({"medgen_segmenter": 1, "image_keys": list(image_keys), "space": space.state_dict(),
                "state_dict": net.state_dict()}, path)
    return path


def load_segmenter(path: str | Path, image_keys: list[str], space: SampleSpace, device: torch.device) -> DynUNet:
    """A network saved by :func:`save_segmenter` (``seg_net_checkpoint=``), checked against the sets
    (their ``space``: the slice size, or the volume shape of a 3D set)."""
    from medgen.core.paths import resolve_path
    from medgen.evaluation import EvaluationError

    p = resolve_path(path)
    if not p.is_file():
        raise EvaluationError(f"seg_net_checkpoint={path}: {p} does not exist")
    ckpt = torch.load(p, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "medgen_segmenter" not in ckpt:
        raise EvaluationError(f"seg_net_checkpoint={path}: not a network saved by medgen-evaluate (seg_net.pt)")
    recorded = SampleSpace.from_state(ckpt["space"])
    if list(ckpt["image_keys"]) != list(image_keys) or recorded.shape != space.shape:
        raise EvaluationError(f"seg_net_checkpoint={path} segments {list(ckpt['image_keys'])} at "
                              f"{_size_text(recorded)}, but the synthetic set holds {list(image_keys)} at "
                              f"{_size_text(space)}: give the "
                              "seg_net.pt of an evaluation of such a set, or leave seg_net_checkpoint unset to train "
                              "one on the real train split")
    net = build_segmenter(len(image_keys), recorded)
    net.load_state_dict(ckpt["state_dict"])
    return net.to(device).eval()
