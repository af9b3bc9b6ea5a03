"""What a generation run is asked to do, as typed values: made once from the validated generate
config (:meth:`GenerateRequest.from_config`) at the top of :func:`medgen.generation.pipeline.run_generation`,
so no stage below it reads the Hydra config.

:class:`GenerateRequest` holds the parts each stage takes: the checkpoints and how to load them
(:class:`Loading`), the samplers (:class:`Samplers`), stage 1 (:class:`MaskRequest`: the gate's
rules, :class:`GateRules`, and the size and count requests, :class:`SizeRequest` and
:class:`CountRequest`; or :class:`RealMasks` with ``masks_from``), stage 2 (:class:`PaintRequest`) and
the folder written (:class:`Output`). How each candidate and sample draws its noise is
:class:`Sampling`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

__all__ = ["CountRequest", "GateRules", "GenerateRequest", "InsertRequest", "Loading", "MaskRequest", "Output", "PaintRequest",
           "RealMasks", "Samplers", "Sampling", "SizeRequest", "quota_keys"]


@dataclass(frozen=True)
class Sampling:
    """How every mask candidate and sample is drawn: its seed, the sampler's steps, the batch size."""

    seed: int
    steps: int
    batch_size: int


@dataclass(frozen=True)
class GateRules:
    """The quality gate's rules (``gate.*``); a null ``min_area`` or ``min_component_pixels`` is set
    for the run's sample space by :func:`medgen.generation.gate.with_defaults`."""

    enabled: bool
    min_area: float | None
    max_area: float
    max_components: int
    min_component_pixels: int | None
    inside_brain: bool
    max_attempts: int | None

    def settings(self) -> dict[str, Any]:
        """As ``settings.json`` records them."""
        return asdict(self)


@dataclass(frozen=True)
class SizeRequest:
    """``lesion_sizes``: the size target (model, real, uniform or weights), its bins and guidance."""

    target: Any
    bins: Any
    guidance: float

    def settings(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CountRequest:
    """``lesion_counts``: the count target (model, real, uniform or weights) and its classes."""

    target: Any
    classes: Any

    def settings(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MaskRequest:
    """Stage 1: ``num_images`` masks (None: every real mask of ``masks_from``), the gate, the size and
    count requests, and the brain each mask is painted in (``brain_outline``)."""

    num_images: int | None
    sampling: Sampling
    gate: GateRules
    sizes: SizeRequest
    counts: CountRequest
    brain_outline: str

    def target(self, key: str) -> Any:
        """``key.target`` as given (``lesion_sizes`` or ``lesion_counts``), for messages."""
        return self.sizes.target if key == "lesion_sizes" else self.counts.target

    def quota_keys(self) -> list[str]:
        """:func:`medgen.generation.sizes.requested_quotas` of the two requests."""
        from medgen.generation.sizes import requested_quotas

        return requested_quotas(self.sizes, self.counts)


@dataclass(frozen=True)
class RealMasks:
    """``masks_from``: the real dataset (``root``), its ``split`` and the cache its masks are read into."""

    root: str
    split: str
    cache_dir: str


@dataclass(frozen=True)
class PaintRequest:
    """Stage 2: the images painted on each mask, ``samples_per_mask`` each, into ``split``."""

    sampling: Sampling
    guidance_scale: float
    samples_per_mask: int
    split: str
    previews: bool


@dataclass(frozen=True)
class Output:
    """The folder written: ``out_dir`` (as given), its split, and the export (``format``, ``nnunet.*``)."""

    out_dir: str
    split: str
    previews: bool
    format: str
    nnunet_id: int
    nnunet_name: str


@dataclass(frozen=True)
class Loading:
    """The two checkpoints and how their networks are loaded."""

    #: None only for insertion's copy painter
    image_checkpoint: str | None
    seg_checkpoint: str | None
    device: str | None
    use_ema: bool
    precision: str
    compile: str
    compile_mode: str


@dataclass(frozen=True)
class Samplers:
    """``sampler``, ``seg_sampler`` and ``image_sampler`` as given (None: the model's first)."""

    sampler: str | None
    seg_sampler: str | None
    image_sampler: str | None


@dataclass(frozen=True)
class InsertRequest:
    """``insert.*``: lesions painted into the real scans of ``split`` of the dataset ``into``
    (:mod:`medgen.generation.insert`), read into ``cache_dir``."""

    into: str
    split: str
    painter: str
    keep_source: bool
    margin: int
    shapes: str
    shapes_from: str | None
    image_size: Any
    modalities: tuple[str, ...]
    brain_method: str | None
    cache_dir: str

    def settings(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("cache_dir")
        out["modalities"] = list(self.modalities)
        return out


@dataclass(frozen=True)
class GenerateRequest:
    """A whole run's request (see the module docstring)."""

    loading: Loading
    samplers: Samplers
    masks: MaskRequest
    real: RealMasks | None
    paint: PaintRequest
    output: Output
    #: lesions painted into real scans (``insert.into``), or None: whole images
    insert: InsertRequest | None

    @classmethod
    def from_config(cls, cfg: Any) -> "GenerateRequest":
        """The request of a validated generate config
        (:func:`medgen.generation.config.validate_generate_config`)."""
        from omegaconf import OmegaConf

        sampling = Sampling(int(cfg.seed), int(cfg.steps), int(cfg.batch_size))
        masks = MaskRequest(None if cfg.num_images is None else int(cfg.num_images), sampling,
                            GateRules(**OmegaConf.to_container(cfg.gate)),
                            _sizes(cfg), _counts(cfg), str(cfg.brain_outline))
        real = None if cfg.masks_from is None else RealMasks(str(cfg.masks_from), str(cfg.masks_split),
                                                             str(cfg.cache_dir))
        ins = cfg.insert
        insert = None if ins.into is None else InsertRequest(
            str(ins.into), str(ins.split), str(ins.painter), bool(ins.keep_source), int(ins.margin), str(ins.shapes),
            None if ins.shapes_from is None else str(ins.shapes_from), _plain(OmegaConf, ins.image_size), tuple(ins.modalities), ins.brain_method, str(cfg.cache_dir))
        image = None if cfg.image_checkpoint is None else str(cfg.image_checkpoint)
        return cls(Loading(image, None if cfg.seg_checkpoint is None else str(cfg.seg_checkpoint),
                           cfg.device, bool(cfg.use_ema), str(cfg.precision), str(cfg.compile), str(cfg.compile_mode)),
                   Samplers(cfg.sampler, cfg.seg_sampler, cfg.image_sampler), masks, real,
                   PaintRequest(sampling, float(cfg.guidance_scale), int(cfg.samples_per_mask), str(cfg.split),
                                bool(cfg.previews)),
                   Output(str(cfg.out_dir), str(cfg.split), bool(cfg.previews), str(cfg.format),
                          int(cfg.nnunet.dataset_id), str(cfg.nnunet.name)), insert)

    def with_gate(self, gate: GateRules) -> "GenerateRequest":
        """The same request with the gate's rules ``gate`` (its null rules set for the run)."""
        return replace(self, masks=replace(self.masks, gate=gate))


def _sizes(cfg: Any) -> SizeRequest:
    from omegaconf import OmegaConf

    node = cfg.lesion_sizes
    return SizeRequest(_plain(OmegaConf, node.target), _plain(OmegaConf, node.bins), float(node.guidance))


def _counts(cfg: Any) -> CountRequest:
    from omegaconf import OmegaConf

    return CountRequest(_plain(OmegaConf, cfg.lesion_counts.target), _plain(OmegaConf, cfg.lesion_counts.classes))


def _plain(omegaconf: Any, value: Any) -> Any:
    """A config value as plain Python (lists and dicts, as ``settings.json`` records them)."""
    return omegaconf.to_container(value) if omegaconf.is_config(value) else value


def quota_keys(cfg: Any) -> list[str]:
    """``lesion_sizes`` and/or ``lesion_counts`` where the config ``cfg`` asks for quotas of its own
    (:func:`medgen.generation.sizes.requested_quotas`); the config's validation asks this before any
    model is loaded."""
    from medgen.generation.sizes import requested_quotas

    return requested_quotas(_sizes(cfg), _counts(cfg))
