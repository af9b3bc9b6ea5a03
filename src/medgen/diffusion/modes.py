"""Training modes: which channels the network sees and predicts (docs/architecture.md).

=========  ================================  ======================================  ========================
mode       generates (``image_keys``)        network input                           in -> out channels
=========  ================================  ======================================  ========================
seg        the tumour mask and the brain     ``[x_t(seg), x_t(brain)]``              2 -> 2 (+ class planes)
bravo      ``bravo`` given mask and brain    ``[x_t, mask, brain]``                  3 -> 1
dual       ``t1_pre`` + ``t1_gd``            ``[x_t(pre), x_t(post), mask, brain]``  4 -> 2
inpaint    images inside a region of a scan  ``[x_t, known, region, mask, brain]``   5 -> 1 (dual keys: 7 -> 2)
=========  ================================  ======================================  ========================

The ``brain`` key (a mask derived from an image when the slice cache is built, see
:mod:`medgen.data.brain`) is optional: ``mode.image_keys=[seg]`` / ``mode.cond_keys=[seg]`` give
the anatomy-blind modes of medgen before 0.2 (1 -> 1, 2 -> 1, 3 -> 2 channels). With it, the mask
model draws each lesion together with the brain it lies in, and the image model paints a head
around that brain.

Batches from the data loader are dicts of ``[B, 1, H, W]`` float tensors in [0, 1] (volumes:
``[B, 1, X, Y, Z]``; every shape below has 2 or 3 spatial dimensions alike), one per
modality key (``seg`` in {0, 1}). A mode maps them to model space [-1, 1] (``split``), builds
the network input (``model_input``) and maps generated ``x0`` back to [0, 1] per key
(``to_outputs``; masks, the lesion mask and the brain, binarised with the one shared
:func:`binarize_mask`).

Unconditional (:class:`SegmentationMode`) and mask-conditioned modes are two implementations of
one interface: the unconditional mode's condition is ``None``. The seg mode can instead be
conditioned on the **size class of its largest lesion** (``mode.size_bins``: ``rano_bm`` or edges
in mm) and / or the **class of its number of lesions** (``mode.count_classes``, e.g. ``[1, 2, 3, 4]``):
the condition is ``1 + len(classes)`` constant planes per group, a one-hot of the class (plane 0: no
lesion) in model space (+1 on, -1 off), all -1 for "no class given" (classifier-free guidance
trains with it, ``training.cond_dropout``). Training batches then carry ``lesion_mm`` (each
slice's largest lesion, mm) and ``lesion_count``, from which :meth:`SegmentationMode.size_classes`
and :meth:`SegmentationMode.count_class_index` take the classes.

What a mode can do in a generation run follows from its keys: a mode that generates the mask
(``seg`` in ``image_keys``) can make the masks, one conditioned on the mask (``seg`` in
``cond_keys``) can paint the images. Which training slices it learns from is declared by its
class (``slice_selection``).
"""

from __future__ import annotations

import abc
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import Tensor

from medgen.core.constants import BRAIN_KEY, IMAGE_MODALITIES, LESION_COUNT_KEY, LESION_MM_KEY, MASK_KEY
from medgen.data.lesions import SizeBins, parse_bins, parse_count_classes
from medgen.data.masks import binarize_mask
from medgen.data.transforms import from_model_space, to_model_space

__all__ = [
    "TrainingMode",
    "SegmentationMode",
    "ConditionalSingleMode",
    "ConditionalDualMode",
    "MODES",
    "register_mode",
    "build_mode",
]

#: the dimensions of a batch tensor: ``[B, C, H, W]`` (slices) or ``[B, C, X, Y, Z]`` (volumes)
_NDIMS = (4, 5)
#: post-processing of one generated channel in [0, 1], per key (identity if absent)
_OUTPUT_TRANSFORMS: dict[str, Callable[[Tensor], Tensor]] = {MASK_KEY: binarize_mask, BRAIN_KEY: binarize_mask}


class TrainingMode(abc.ABC):
    """Channel layout of one mode, built from a validated ``cfg.mode`` (name, image_keys, cond_keys).

    The key rules are class attributes, checked by ``medgen.diffusion.config.validate_config`` (not
    here): ``image_key_choices``/``num_image_keys``/``required_image_keys`` and the same three for
    ``cond_keys`` (a count is a number or a tuple of the numbers allowed). Channel counts are
    derived from the keys.

    Attributes:
        name: registry name (``mode.name``).
        image_keys: the generated modalities, in output-channel order.
        cond_keys: the conditioning modalities (``()``, ``("seg",)`` or ``("seg", "brain")``).
        supports_perceptual: whether a perceptual loss may be applied to the outputs
            (never to masks).
        slice_selection: the training slices it learns from: ``"lesion"`` (slices with a lesion;
            every slice with ``data.seg_positive_only=false``) or ``"brain"`` (slices where every
            image shows brain); the data layer applies it (``SliceSpec.for_mode``).
    """

    name: ClassVar[str]
    supports_perceptual: ClassVar[bool]
    slice_selection: ClassVar[str]
    image_key_choices: ClassVar[tuple[str, ...]]
    num_image_keys: ClassVar[int | tuple[int, ...]]
    required_image_keys: ClassVar[tuple[str, ...]] = ()
    cond_key_choices: ClassVar[tuple[str, ...]] = ()
    num_cond_keys: ClassVar[int | tuple[int, ...]] = 0
    required_cond_keys: ClassVar[tuple[str, ...]] = ()
    #: whether ``mode.size_bins`` / ``mode.count_classes`` may condition it on its lesions' size / count class
    lesion_conditionable: ClassVar[bool] = False
    #: whether it paints into real scans, window by window (``mode=inpaint``, :mod:`medgen.diffusion.inpaint`)
    paints_into_scans: ClassVar[bool] = False

    def __init__(self, cfg_mode: Any):
        self.image_keys: tuple[str, ...] = tuple(cfg_mode["image_keys"])
        self.cond_keys: tuple[str, ...] = tuple(cfg_mode["cond_keys"])

    @property
    def cond_channels(self) -> int:
        """Channels of the condition: ``len(cond_keys)`` (a size-conditioned seg mode: one per class)."""
        return len(self.cond_keys)

    @property
    def in_channels(self) -> int:
        """Network input channels: ``len(image_keys) + cond_channels``."""
        return len(self.image_keys) + self.cond_channels

    @property
    def out_channels(self) -> int:
        """Network output channels: ``len(image_keys)``."""
        return len(self.image_keys)

    def sample_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The spatial shape the network trains and samples at, for items of ``shape``: ``shape``."""
        return tuple(shape)

    @property
    def is_conditional(self) -> bool:
        return self.cond_channels > 0

    @property
    def lesion_conditioned(self) -> bool:
        """Whether it is conditioned on its lesions' size or count class (its batches need ``lesion_mm``
        and ``lesion_count``)."""
        return False

    @property
    def generates_mask(self) -> bool:
        """Whether it generates the tumour mask (``seg`` in ``image_keys``): it can make a
        generation run's masks."""
        return MASK_KEY in self.image_keys

    @property
    def knows_brain(self) -> bool:
        """Whether the brain mask is one of its channels (generated or a condition)."""
        return BRAIN_KEY in self.image_keys or BRAIN_KEY in self.cond_keys

    @property
    def mask_conditioned(self) -> bool:
        """Whether it is conditioned on the tumour mask (``seg`` in ``cond_keys``): it can paint a
        generation run's images for given masks."""
        return MASK_KEY in self.cond_keys

    # ---------------------------------------------------------------- batch -> model space
    def _stack(self, batch: Mapping[str, Tensor], keys: tuple[str, ...]) -> Tensor:
        """``[B, len(keys), H, W]`` from the ``[B, 1, H, W]`` entries of ``batch``, in model space."""
        channels = []
        for key in keys:
            if key not in batch:
                raise KeyError(f"mode {self.name!r} needs batch[{key!r}]; the batch has {sorted(batch)}")
            x = batch[key]
            if x.ndim not in _NDIMS or x.shape[1] != 1:
                raise ValueError(f"batch[{key!r}] must be [B, 1, H, W] or [B, 1, X, Y, Z], got {tuple(x.shape)}")
            if channels and x.shape != channels[0].shape:
                raise ValueError(
                    f"batch[{key!r}] has shape {tuple(x.shape)} but batch[{keys[0]!r}] has {tuple(channels[0].shape)}"
                )
            channels.append(x)
        return to_model_space(torch.cat(channels, dim=1))

    @abc.abstractmethod
    def split(self, batch: Mapping[str, Tensor],
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        """``batch`` -> ``(x0 [B, out_channels, H, W], cond [B, cond_channels, H, W] or None)``, both in [-1, 1].

        ``generator``: the training step's (on its own device), for a mode that draws something per
        item (inpaint: its regions); the other modes draw nothing from it.
        """

    def grid_columns(self, batch: Mapping[str, Tensor], cond: Tensor | None) -> list[tuple[str, Tensor]]:
        """The sample grid's condition columns ``(label, [B, 1, H, W] in [0, 1])`` for ``batch`` and its
        condition ``cond`` (from :meth:`split`): the condition keys' channels of the batch."""
        return [(k, batch[k]) for k in self.cond_keys]

    @abc.abstractmethod
    def model_input(self, x_t: Tensor, cond: Tensor | None) -> Tensor:
        """Network input ``[B, in_channels, H, W]``: the ``x_t`` channels, then the condition."""

    @abc.abstractmethod
    def null_cond(self, cond: Tensor | None) -> Tensor | None:
        """The condition "nothing given": every condition channel (mask, brain) all background
        (-1 in model space), shaped like ``cond``."""

    @abc.abstractmethod
    def drop_cond(self, cond: Tensor | None, p: float, generator: torch.Generator) -> Tensor | None:
        """Replace each sample's condition by :meth:`null_cond` with probability ``p`` (CFG dropout).

        Exactly ``B`` uniforms are drawn from ``generator`` (on its own device) whatever ``p``.
        """

    # ---------------------------------------------------------------- model space -> outputs
    def to_outputs(self, x0_model: Tensor) -> dict[str, Tensor]:
        """Generated ``x0 [B, out_channels, H, W]`` in model space -> ``{key: [B, 1, H, W]}`` in [0, 1].

        Images are clamped to [0, 1]; the mask is binarised to {0, 1} with :func:`binarize_mask`.
        """
        if x0_model.ndim not in _NDIMS or x0_model.shape[1] != self.out_channels:
            raise ValueError(f"mode {self.name!r} outputs [B, {self.out_channels}, H, W], got {tuple(x0_model.shape)}")
        out = {}
        for i, key in enumerate(self.image_keys):
            x = from_model_space(x0_model[:, i : i + 1].float())
            out[key] = _OUTPUT_TRANSFORMS.get(key, lambda v: v)(x)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_keys={list(self.image_keys)}, cond_keys={list(self.cond_keys)})"

    def _check_x_t(self, x_t: Tensor) -> None:
        if x_t.ndim not in _NDIMS or x_t.shape[1] != self.out_channels:
            raise ValueError(f"mode {self.name!r}: x_t must be [B, {self.out_channels}, H, W], got {tuple(x_t.shape)}")


# ============================================================================ registry
MODES: dict[str, type[TrainingMode]] = {}


def register_mode(cls: type[TrainingMode]) -> type[TrainingMode]:
    """Class decorator: make ``cls`` available as ``mode=<cls.name>`` (its YAML file is
    ``configs/mode/<name>.yaml``)."""
    MODES[cls.name] = cls
    return cls


# ============================================================================ seg
@register_mode
class SegmentationMode(TrainingMode):
    """Mask generation: noise -> ``seg`` (and ``brain``, the brain the lesions lie in); the
    condition is ``None``, or with ``size_bins`` / ``count_classes`` the size class of the largest
    lesion and / or the class of the number of lesions (planes)."""

    name = "seg"
    supports_perceptual = False  # perceptual features of a binary mask are meaningless
    slice_selection = "lesion"
    image_key_choices = (MASK_KEY, BRAIN_KEY)
    num_image_keys = (1, 2)
    required_image_keys = (MASK_KEY,)
    lesion_conditionable = True

    def __init__(self, cfg_mode: Any):
        super().__init__(cfg_mode)
        bins, counts = cfg_mode.get("size_bins"), cfg_mode.get("count_classes")
        #: the size classes of the largest lesion it is conditioned on (None: not)
        self.size_bins: SizeBins | None = None if bins is None else parse_bins(bins)
        #: the lesion-count classes it is conditioned on (None: not)
        self.count_classes: SizeBins | None = None if counts is None else parse_count_classes(counts)

    @property
    def lesion_conditioned(self) -> bool:
        return self.size_bins is not None or self.count_classes is not None

    @property
    def cond_channels(self) -> int:
        return sum(1 + len(b) for b in (self.size_bins, self.count_classes) if b is not None)

    def size_classes(self, lesion_mm: Tensor) -> Tensor:
        """``[B]`` int64 classes of largest-lesion diameters ``lesion_mm`` (mm): 0 no lesion, ``1 + bin``."""
        return _classes(lesion_mm, self.size_bins)

    def count_class_index(self, lesion_count: Tensor) -> Tensor:
        """``[B]`` int64 classes of lesion counts ``lesion_count``: 0 no lesion, ``1 + class``."""
        return _classes(lesion_count, self.count_classes)

    def lesion_condition(self, spatial: tuple[int, ...], sizes: Tensor | None = None,
                         counts: Tensor | None = None) -> Tensor:
        """The condition planes ``[B, cond_channels, H, W]`` (model space): the one-hot of the size
        classes ``sizes``, then of the count classes ``counts`` (``[B]`` each, from :meth:`size_classes`
        / :meth:`count_class_index`; -1: no class given, every plane of the group -1), for the
        groups the mode is conditioned on."""
        parts = []
        for name, bins, classes in (("sizes", self.size_bins, sizes), ("counts", self.count_classes, counts)):
            if bins is None:
                continue
            if classes is None:
                raise ValueError(f"seg mode conditioned on lesion {name} needs their classes")
            classes = classes.reshape(-1).long()
            parts.append(2 * (classes[:, None] == torch.arange(1 + len(bins), device=classes.device)).float() - 1)
        planes = torch.cat(parts, 1)
        return planes.view(*planes.shape, *([1] * len(spatial))).expand(-1, -1, *spatial).contiguous()

    def split(self, batch: Mapping[str, Tensor],
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        x0 = self._stack(batch, self.image_keys)
        if not self.lesion_conditioned:
            return x0, None
        missing = [k for k in (LESION_MM_KEY, LESION_COUNT_KEY) if k not in batch]
        if missing:
            raise KeyError(f"a seg mode conditioned on lesion sizes or counts needs batch{missing} (each slice's "
                           "largest lesion, mm, and lesion count: build the data with sizes=True); the batch has "
                           + str(sorted(batch)))
        sizes = self.size_classes(batch[LESION_MM_KEY]) if self.size_bins is not None else None
        counts = self.count_class_index(batch[LESION_COUNT_KEY]) if self.count_classes is not None else None
        return x0, self.lesion_condition(tuple(x0.shape[2:]), sizes, counts).to(x0)

    def _check_cond(self, cond: Tensor | None) -> Tensor | None:
        if not self.lesion_conditioned:
            if cond is not None:
                raise ValueError("seg mode is unconditional (mode.size_bins and mode.count_classes null); cond must "
                                 "be None")
            return None
        if cond is None or cond.ndim not in _NDIMS or cond.shape[1] != self.cond_channels:
            raise ValueError(f"seg mode with mode.size_bins or mode.count_classes takes the class planes "
                             f"[B, {self.cond_channels}, H, W] as cond, got {None if cond is None else tuple(cond.shape)}")
        return cond

    def model_input(self, x_t: Tensor, cond: Tensor | None) -> Tensor:
        self._check_x_t(x_t)
        cond = self._check_cond(cond)
        return x_t if cond is None else torch.cat([x_t, cond.to(x_t.dtype)], dim=1)

    def null_cond(self, cond: Tensor | None) -> Tensor | None:
        cond = self._check_cond(cond)
        return None if cond is None else torch.full_like(cond, -1.0)

    def drop_cond(self, cond: Tensor | None, p: float, generator: torch.Generator) -> Tensor | None:
        cond = self._check_cond(cond)
        return None if cond is None else _drop(cond, self.null_cond(cond), p, generator)


def _classes(values: Tensor, bins: SizeBins) -> Tensor:
    """``[B]`` int64: 0 where ``values`` is 0 (no lesion), else ``1 +`` the class of ``bins`` it falls in."""
    v = values.detach().reshape(-1).double().cpu()
    edges = torch.tensor(bins.edges, dtype=torch.float64)
    return torch.where(v > 0, 1 + torch.bucketize(v, edges, right=True), 0).to(values.device)


def _drop(cond: Tensor, null: Tensor, p: float, generator: torch.Generator) -> Tensor:
    """Each sample's ``cond`` replaced by ``null`` with probability ``p``; exactly ``B`` uniforms drawn."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"condition dropout probability must be in [0, 1], got {p}")
    u = torch.rand(cond.shape[0], generator=generator, device=generator.device).to(cond.device)
    drop = (u < p).view(-1, *([1] * (cond.ndim - 1)))
    return torch.where(drop, null, cond)


# ============================================================================ mask-conditioned
class _MaskConditionedMode(TrainingMode):
    """Images generated given the tumour mask (and the brain): input ``[x_t channels..., mask, brain]``."""

    supports_perceptual = True
    slice_selection = "brain"
    image_key_choices = IMAGE_MODALITIES
    cond_key_choices = (MASK_KEY, BRAIN_KEY)
    num_cond_keys = (1, 2)
    required_cond_keys = (MASK_KEY,)

    def split(self, batch: Mapping[str, Tensor], generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        x0 = self._stack(batch, self.image_keys)
        cond = self._stack(batch, self.cond_keys)
        if cond.shape[0] != x0.shape[0] or cond.shape[2:] != x0.shape[2:]:
            raise ValueError(
                f"condition {list(self.cond_keys)} has shape {tuple(cond.shape)}, images {tuple(x0.shape)}"
            )
        return x0, cond

    def _check_cond(self, cond: Tensor | None) -> Tensor:
        if cond is None:
            raise ValueError(f"{self.name} mode is conditional; pass the mask (or null_cond(...) for unconditional)")
        if cond.ndim not in _NDIMS or cond.shape[1] != self.cond_channels:
            raise ValueError(f"cond must be [B, {self.cond_channels}, H, W], got {tuple(cond.shape)}")
        return cond

    def model_input(self, x_t: Tensor, cond: Tensor | None) -> Tensor:
        self._check_x_t(x_t)
        cond = self._check_cond(cond)
        if cond.shape[0] != x_t.shape[0] or cond.shape[2:] != x_t.shape[2:]:
            raise ValueError(f"cond {tuple(cond.shape)} does not match x_t {tuple(x_t.shape)} in batch or spatial size")
        return torch.cat([x_t, cond.to(x_t.dtype)], dim=1)

    def null_cond(self, cond: Tensor | None) -> Tensor:
        return to_model_space(torch.zeros_like(self._check_cond(cond)))

    def drop_cond(self, cond: Tensor | None, p: float, generator: torch.Generator) -> Tensor:
        cond = self._check_cond(cond)
        return _drop(cond, self.null_cond(cond), p, generator)


@register_mode
class ConditionalSingleMode(_MaskConditionedMode):
    """``[x_t, mask, brain] -> bravo`` (one image modality given the mask and the brain)."""

    name = "bravo"
    num_image_keys = 1


@register_mode
class ConditionalDualMode(_MaskConditionedMode):
    """``[x_t(t1_pre), x_t(t1_gd), mask, brain] -> t1_pre + t1_gd`` (two co-registered contrasts)."""

    name = "dual"
    num_image_keys = 2


def build_mode(cfg: Any) -> TrainingMode:
    """The mode of a validated config, built from ``cfg.mode``."""
    return MODES[cfg.mode.name](cfg.mode)


# the inpainting painter registers itself (mode=inpaint) wherever the modes are imported
from medgen.diffusion import inpaint as _inpaint  # noqa: E402,F401  (it imports this module)
