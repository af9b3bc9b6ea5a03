"""Optional RadImageNet perceptual loss for image modes (docs/architecture.md, "Training").

The loss is MONAI's :class:`monai.losses.PerceptualLoss` with
``network_type="radimagenet_resnet50"``: the images go through the RadImageNet ResNet50
(up to ``layer4``, no pooling), the features are unit-normalised across channels, and the
squared difference is summed over channels and averaged over space and batch. MONAI's own
``RadImageNetPerceptualSimilarity`` does the preprocessing (grey -> 3 channels, RGB -> BGR,
subtraction of the RadImageNet channel means), so inputs are expected in ``[0, 1]``.

The network and its weights come from :mod:`medgen.diffusion.radimagenet`: the file at
``training.perceptual_weights_path`` (authoritative: if it does not exist that is an error),
else the torch hub cache; the loaded network is handed to MONAI's ``PerceptualLoss``. Only
with ``allow_download=True`` and no configured path does MONAI's own path run instead, i.e.
``PerceptualLoss`` calling ``torch.hub.load("Project-MONAI/perceptual-models:main",
"radimagenet_resnet50")``, which fetches the repo from GitHub and the checkpoint from Hugging
Face. With ``allow_download=False`` no code path here reaches ``torch.hub.load`` or any other
network call; a missing file costs only a few ``stat`` calls before
:class:`PerceptualWeightsError` explains what to do.

Volumes (``model.spatial_dims=3``) are scored in 2.5D by :class:`PlanesPerceptualLoss`: each step
``training.perceptual_slices`` slices of each plane (axial, coronal, sagittal) are drawn from the
step's own generator, never from torch's global one, so a resumed run draws the same slices.
MONAI's ``is_fake_3d`` does the same with the global RNG, which would break exact resume.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import monai.losses.perceptual as monai_perceptual
import torch
from monai.losses import PerceptualLoss
from torch import nn

from medgen.diffusion.radimagenet import (HUB_ENTRYPOINT, HUB_REPO, WEIGHTS_FILENAME, WEIGHTS_URL,
                                          RadImageNetWeightsError, find_radimagenet_weights, hub_cache_search_list,
                                          load_radimagenet_resnet50)

logger = logging.getLogger(__name__)

NETWORK_TYPE = "radimagenet_resnet50"
WEIGHT_KEY = "training.perceptual_weight"
PATH_KEY = "training.perceptual_weights_path"
DOWNLOAD_KEY = "training.perceptual_allow_download"


class PerceptualWeightsError(RadImageNetWeightsError):
    """The perceptual loss is enabled but the RadImageNet ResNet50 weights are not on this machine
    (an unusable file raises the :class:`RadImageNetWeightsError` of loading it)."""


def _missing_weights_message(
    weight: float,
    weights_path: str | os.PathLike[str] | None,
    download_error: BaseException | None = None,
) -> str:
    """The user-facing explanation of where to put the weights, how to get them, how to opt out."""
    hub_places = hub_cache_search_list()
    lines = [
        f"Perceptual loss is enabled ({WEIGHT_KEY}={weight}) but the RadImageNet ResNet50 weights "
        f"({WEIGHTS_FILENAME}) are not available on this machine."
    ]
    if weights_path is not None and str(weights_path) != "":
        lines.append(f"The configured file {PATH_KEY}={weights_path} does not exist.")
    else:
        lines.append("Searched the torch hub cache (torch.hub.get_dir(), moved by $TORCH_HOME):")
        lines.extend(f"  - {p}" for p in hub_places)
    if download_error is not None:
        lines.append(
            f"Downloading through torch hub ({HUB_REPO}) failed: "
            f"{type(download_error).__name__}: {download_error}"
        )
    else:
        lines.append("Downloading is disabled (the default: cluster nodes are often offline).")
    lines += [
        "Fix it in one of these ways:",
        f"  1. Put the file at {hub_places[0]}",
        f"     or anywhere and set {PATH_KEY}=/path/to/file.pth",
        "  2. Get the file on a machine with internet access by running once:",
        "       python -c \"import torch; m = torch.hub.load('"
        + HUB_REPO
        + "', '"
        + HUB_ENTRYPOINT
        + "', trust_repo=True); torch.save(m.state_dict(), '"
        + WEIGHTS_FILENAME
        + "')\"",
        f"     (or download {WEIGHTS_URL}),",
        "     then copy that file to this machine as in 1.",
        f"     If this machine itself is online, {DOWNLOAD_KEY}=true lets MONAI download it instead.",
        f"  3. Turn the perceptual loss off: {WEIGHT_KEY}=0",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Loss module
# --------------------------------------------------------------------------------------


class _PreloadedRadImageNetSimilarity(monai_perceptual.RadImageNetPerceptualSimilarity):
    """MONAI's RadImageNet similarity (its preprocessing and feature distance) around a
    network that is already loaded, instead of one fetched through ``torch.hub.load``."""

    def __init__(self, model: nn.Module) -> None:
        nn.Module.__init__(self)
        self.model = model
        self.eval()
        for param in self.parameters():
            param.requires_grad = False


def _monai_loss_around(network: nn.Module) -> PerceptualLoss:
    """Build MONAI's 2D ``PerceptualLoss(network_type="radimagenet_resnet50")`` around ``network``.

    ``PerceptualLoss.__init__`` constructs ``RadImageNetPerceptualSimilarity`` by its module
    level name, which would call ``torch.hub.load``; for the duration of the constructor
    that name is pointed at a factory returning :class:`_PreloadedRadImageNetSimilarity`.
    """
    original = monai_perceptual.RadImageNetPerceptualSimilarity

    def factory(net: str, verbose: bool = False, cache_dir: str | None = None) -> nn.Module:
        return _PreloadedRadImageNetSimilarity(network)

    monai_perceptual.RadImageNetPerceptualSimilarity = factory  # type: ignore[misc,assignment]
    try:
        loss = PerceptualLoss(spatial_dims=2, network_type=NETWORK_TYPE, is_fake_3d=False)
    finally:
        monai_perceptual.RadImageNetPerceptualSimilarity = original  # type: ignore[misc]
    if not isinstance(loss.perceptual_function, _PreloadedRadImageNetSimilarity):
        raise RuntimeError(
            "monai.losses.PerceptualLoss no longer builds its RadImageNet network through "
            "monai.losses.perceptual.RadImageNetPerceptualSimilarity; medgen's offline loading "
            "must be adapted to this MONAI version."
        )
    return loss


class RadImageNetPerceptualLoss(nn.Module):
    """``loss(pred, target)`` for ``[B, C, H, W]`` images in ``[0, 1]``; returns an fp32 scalar.

    Each channel is scored on its own (MONAI's RadImageNet similarity turns a 1-channel
    image into grey RGB; medgen's channels are MRI sequences, not colours) and the
    per-channel losses are averaged. The network is frozen and stays in eval mode even when
    ``train()`` is called, so BatchNorm statistics never change. Inputs are cast to fp32, so
    the module works both with and without (bf16) autocast.
    """

    def __init__(self, loss: PerceptualLoss, source: str) -> None:
        super().__init__()
        self.loss = loss
        self.source = source
        self.loss.eval()
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> RadImageNetPerceptualLoss:
        """Set the wrapper's flag but keep the feature network in eval mode."""
        super().train(mode)
        self.loss.eval()
        return self

    def forward(self, pred: torch.Tensor, target: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean perceptual distance between ``pred`` and ``target`` over batch and channels
        (``generator`` is unused: an image is scored whole)."""
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        if pred.ndim != 4:
            raise ValueError(f"expected [B, C, H, W] images, got shape {tuple(pred.shape)}")
        b, c, h, w = pred.shape
        pred_1ch = pred.float().reshape(b * c, 1, h, w)
        target_1ch = target.float().reshape(b * c, 1, h, w)
        # Equal-sized channels: the mean over B*C single-channel images is the mean of the
        # per-channel means.
        return self.loss(pred_1ch, target_1ch).float()


#: the planes of a ``[B, C, X, Y, Z]`` volume in RAS order, as (name, axis across which they are cut)
PLANES = (("axial", 4), ("coronal", 3), ("sagittal", 2))


class PlanesPerceptualLoss(nn.Module):
    """2.5D perceptual loss for volumes ``[B, C, X, Y, Z]`` in ``[0, 1]``: the mean over the three
    planes of the slice loss (``slice_loss``, a :class:`RadImageNetPerceptualLoss`) on ``slices``
    slices of that plane, the same positions for every volume of the batch, drawn without
    replacement from ``generator`` (all of them when an axis is shorter). The slices are scored
    at the volume's voxel grid, as stored (no resampling to square pixels)."""

    def __init__(self, slice_loss: RadImageNetPerceptualLoss, slices: int) -> None:
        super().__init__()
        if slices < 1:
            raise ValueError(f"training.perceptual_slices must be >= 1, got {slices}")
        self.slice_loss = slice_loss
        self.slices = int(slices)

    def positions(self, shape: torch.Size, generator: torch.Generator) -> list[torch.Tensor]:
        """The slice indices of each plane in :data:`PLANES` order, drawn from ``generator``."""
        return [torch.randperm(shape[axis], generator=generator, device=generator.device)[:self.slices]
                for _, axis in PLANES]

    def forward(self, pred: torch.Tensor, target: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if pred.shape != target.shape or pred.ndim != 5:
            raise ValueError(f"expected two [B, C, X, Y, Z] volumes of one shape, got {tuple(pred.shape)} "
                             f"and {tuple(target.shape)}")
        if generator is None:
            raise ValueError("the 2.5D perceptual loss draws its slices from the step's generator; none was given")
        total = torch.zeros((), device=pred.device)
        for (_, axis), index in zip(PLANES, self.positions(pred.shape, generator)):
            index = index.to(pred.device)
            total = total + self.slice_loss(_slices(pred, axis, index), _slices(target, axis, index))
        return total / len(PLANES)


def _slices(volume: torch.Tensor, axis: int, index: torch.Tensor) -> torch.Tensor:
    """The slices ``index`` across ``axis`` of ``[B, C, X, Y, Z]`` as a batch of images ``[B * k, C, a, b]``."""
    picked = volume.index_select(axis, index).movedim(axis, 1)  # [B, k, C, a, b]
    return picked.reshape(-1, *picked.shape[2:])


def _download_with_monai() -> PerceptualLoss:
    """MONAI's own construction, which downloads through ``torch.hub.load`` when needed."""
    return PerceptualLoss(spatial_dims=2, network_type=NETWORK_TYPE, is_fake_3d=False)


def build_perceptual_loss(
    weight: float,
    weights_path: str | os.PathLike[str] | None = None,
    allow_download: bool = False,
    device: torch.device | str | None = None,
) -> nn.Module | None:
    """Build the RadImageNet perceptual loss, or return ``None`` when ``weight == 0``.

    Weights are taken from ``weights_path`` if given (it must exist), else from the torch
    hub cache, else - only when ``allow_download`` is true - through MONAI's own
    ``torch.hub.load`` download. The returned module maps ``(pred, target)`` images
    ``[B, C, H, W]`` in ``[0, 1]`` to an fp32 scalar; it is frozen, in eval mode, on
    ``device``. The caller multiplies by ``weight``.

    Raises:
        ValueError: ``weight`` is negative.
        PerceptualWeightsError: no weights; the message says where to put the file, how to
            fetch it on an online machine and how to turn the loss off.
        RadImageNetWeightsError: the weights file found is not a RadImageNet ResNet50 state
            dict (its base class: both are what the user must fix).
    """
    if weight < 0:
        raise ValueError(f"{WEIGHT_KEY} must be >= 0, got {weight}")
    if weight == 0:
        return None

    found = find_radimagenet_weights(weights_path)
    if found is not None:
        network = load_radimagenet_resnet50(found)
        module = RadImageNetPerceptualLoss(_monai_loss_around(network), source=str(found))
    elif allow_download and (weights_path is None or str(weights_path) == ""):
        logger.info("RadImageNet weights not found locally; downloading through torch hub (%s)", HUB_REPO)
        try:
            monai_loss = _download_with_monai()
        except Exception as exc:  # network, HTTP, import and hub errors all mean "no weights"
            raise PerceptualWeightsError(_missing_weights_message(weight, weights_path, exc)) from exc
        module = RadImageNetPerceptualLoss(monai_loss, source=f"torch.hub.load({HUB_REPO!r})")
    else:
        raise PerceptualWeightsError(_missing_weights_message(weight, weights_path))

    logger.info("Perceptual loss: RadImageNet ResNet50 weights from %s", module.source)
    if device is not None:
        module = module.to(device)
    return module.eval()


def perceptual_loss_for(train_cfg: Any, mode: Any, space: Any, device: torch.device | str) -> nn.Module | None:
    """The perceptual loss a run trains with (``training.perceptual_*``), built before any step so
    that missing weights stop the run at once: None for a mode that generates masks or a zero weight;
    for a 3D model the 2.5D :class:`PlanesPerceptualLoss` around the slice loss. The module is called
    as ``loss(pred, target, generator)``."""
    weight = float(train_cfg.perceptual_weight)
    if not mode.supports_perceptual or weight == 0:
        return None
    loss = build_perceptual_loss(weight, train_cfg.perceptual_weights_path, train_cfg.perceptual_allow_download,
                                 device=device)
    return space.either(loss, PlanesPerceptualLoss(loss, train_cfg.perceptual_slices))
