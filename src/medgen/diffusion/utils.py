"""Network construction, checkpoint -> model for inference, sample grids."""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.utils.checkpoint
from monai.networks.nets import DiffusionModelUNet
from PIL import Image

from medgen.core.checkpoint import CheckpointError, load_checkpoint


def network_kwargs(model_cfg, mode, space) -> dict[str, Any]:
    """MONAI ``DiffusionModelUNet`` kwargs for ``cfg.model``, a ``TrainingMode`` and the
    :class:`~medgen.data.space.SampleSpace` (stored in checkpoints): the network builder, the one
    place besides the space that needs the number of spatial dimensions."""
    m = model_cfg
    return {
        "spatial_dims": space.dims,
        "in_channels": mode.in_channels,
        "out_channels": mode.out_channels,
        "channels": [int(c) for c in m.channels],
        "attention_levels": [bool(a) for a in m.attention_levels],
        "num_res_blocks": int(m.num_res_blocks),
        "num_head_channels": int(m.num_head_channels),
        "norm_num_groups": int(m.norm_num_groups),
        # SDPA (torch.nn.functional.scaled_dot_product_attention) in every attention block
        "use_flash_attention": True,
    }


def build_network(kwargs: Mapping[str, Any], checkpointing: bool = False) -> DiffusionModelUNet:
    """The U-Net of ``kwargs`` (:func:`network_kwargs`); with ``checkpointing``, its down, middle and
    up blocks keep no activations for the backward pass and recompute them instead
    (:func:`checkpoint_blocks`)."""
    kw = dict(kwargs)
    kw["channels"] = tuple(kw["channels"])
    kw["attention_levels"] = tuple(kw["attention_levels"])
    net = DiffusionModelUNet(**kw)
    return checkpoint_blocks(net) if checkpointing else net


def checkpoint_blocks(net: DiffusionModelUNet) -> DiffusionModelUNet:
    """Activation checkpointing (``training.gradient_checkpointing``): each down, middle and up block
    of ``net`` becomes a subclass of its own class whose forward, when gradients are on, runs under
    ``torch.utils.checkpoint`` (non-reentrant): the block's activations are recomputed in the
    backward pass instead of kept, the same numbers for less memory and about a third more compute.
    The module tree and the state dict are unchanged (a checkpoint loads either way), and a copy
    (the EMA model) stays a checkpointed copy of itself."""
    for block in [*net.down_blocks, net.middle_block, *net.up_blocks]:
        block.__class__ = _checkpointed(type(block))
    return net


@functools.cache
def _checkpointed(cls: type) -> type:
    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return cls.forward(self, *args, **kwargs)
        return torch.utils.checkpoint.checkpoint(cls.forward, self, *args, use_reentrant=False, **kwargs)

    return type(f"Checkpointed{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})


def compile_enabled(setting: str, device: torch.device) -> bool:
    """``compile`` = ``auto`` | ``true`` | ``false``: auto compiles on CUDA only (on the CPU, eager)."""
    return setting == "true" or (setting == "auto" and device.type == "cuda")


def uses_cuda_graphs(mode: str, device: torch.device) -> bool:
    """Whether ``torch.compile(mode=mode)`` replays CUDA graphs on ``device``: its outputs then live in
    memory that the next call overwrites (``reduce-overhead``, ``max-autotune``; on CUDA only)."""
    return device.type == "cuda" and mode in ("reduce-overhead", "max-autotune")


def compile_module(module: torch.nn.Module, mode: str = "default", dynamic: bool | None = None):
    """``torch.compile(module)`` in ``mode`` (``training.compile_mode``, generation's ``compile_mode``)."""
    return torch.compile(module, mode=None if mode == "default" else mode, dynamic=dynamic)


def sampling_forward(network: torch.nn.Module, device: torch.device, compile: str,
                     logger: logging.Logger | None = None,
                     mode: str = "default") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``network``'s forward for fixed-shape sampling (generation, training's sample grids):
    ``(x [B, C, H, W], t [B]) -> [B, C_out, H, W]``. With ``compile`` = ``true`` (or ``auto`` on
    CUDA) it is compiled for fixed shapes in ``mode`` at its first call, which ``logger`` times; a
    compile failure falls back to eager with one warning. Otherwise it is ``network`` itself, so
    the eager path is the plain module call. The compiled forward reads the module's weights at
    each call: weights updated in place (EMA, training) are seen without recompiling. Under CUDA
    graphs each call's output is copied out of the graph's memory, because samplers keep earlier
    model outputs (multistep solvers) that the next replay would overwrite."""
    if not compile_enabled(compile, device):
        return network
    logger = logger or logging.getLogger("medgen")
    compiled = compile_module(network, mode, dynamic=False)
    if uses_cuda_graphs(mode, device):
        graphed = compiled

        def compiled(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            torch.compiler.cudagraph_mark_step_begin()
            return graphed(x, t).clone()

    state: dict[str, Any] = {"fn": None}

    def forward(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if state["fn"] is not None:
            return state["fn"](x, t)
        t0 = time.perf_counter()
        try:
            out = compiled(x, t)
            state["fn"] = compiled
            logger.info("compiled the sampling network in %.0f s (compile mode %s)", time.perf_counter() - t0, mode)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: eager still works
            logger.warning("torch.compile failed (%s: %s); sampling eagerly", type(exc).__name__,
                           str(exc).splitlines()[0] if str(exc) else "")
            state["fn"] = network
            out = network(x, t)
        return out

    return forward


def network_from_checkpoint(ckpt: Mapping[str, Any], path: str | Path, use_ema: bool = True) -> DiffusionModelUNet:
    """The network of a loaded checkpoint dict (read from ``path``, named in errors), built from
    its stored kwargs, with its EMA weights when present and ``use_ema``, else the raw ones.

    Raises:
        CheckpointError: the weights do not fit the stored network.
    """
    model = build_network(ckpt["network"])
    ema = ckpt.get("ema") if use_ema else None
    if ema is not None:  # ema-pytorch state: the averaged network's entries are under "ema_model."
        weights = {k.removeprefix("ema_model."): v for k, v in ema.items() if k.startswith("ema_model.")}
    else:
        weights = ckpt["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the stored network ({exc})") from None
    return model


def load_model_from_checkpoint(path: str | Path, use_ema: bool = True, device: str | torch.device = "cpu"):
    """Build the network from the checkpoint alone. Returns ``(model.eval(), checkpoint dict)``;
    EMA weights are used when present and ``use_ema``."""
    ckpt = load_checkpoint(path, map_location="cpu")
    return network_from_checkpoint(ckpt, path, use_ema).to(device).eval(), ckpt


def _mix(*values: int) -> int:
    """A 63-bit seed from integers: nearby inputs give unrelated streams (splitmix64 finaliser)."""
    x = 0
    for v in values:
        x = (x * 1_000_003 + int(v)) & 0xFFFFFFFFFFFFFFFF
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of training step ``step`` on ``rank``: a resumed run draws the same timesteps and
    noise as an uninterrupted one."""
    x = (int(seed) * 1_000_003 + int(step)) * 1_009 + int(rank)
    return _mix(x)


def sample_seed(seed: int, index: int, stream: int = 0) -> int:
    """Seed of one sample (a validation slice, a generated image): its draws do not depend on
    the batch it is in, the number of processes, or interruptions. ``stream`` separates uses."""
    return _mix(0x5A3C, seed, stream, index)


def make_grid(rows: list[list[np.ndarray]], labels: list[str] | None = None, scale: int = 1, pad: int = 2) -> np.ndarray:
    """Tile ``rows`` of ``[H, W]`` images in [0, 1] into one uint8 ``[H', W']`` picture, enlarged
    ``scale`` times (nearest neighbour), with a header band naming the columns when ``labels`` is given."""
    from PIL import ImageDraw

    h, w = rows[0][0].shape
    ncol = max(len(r) for r in rows)
    out = np.ones((len(rows) * (h + pad) + pad, ncol * (w + pad) + pad), dtype=np.float32)
    for i, r in enumerate(rows):
        for j, img in enumerate(r):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y : y + h, x : x + w] = np.clip(img, 0, 1)
    img = Image.fromarray((out * 255).round().astype(np.uint8))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    if labels:
        band = 14
        canvas = Image.new("L", (img.width, img.height + band), color=0)
        canvas.paste(img, (0, band))
        draw = ImageDraw.Draw(canvas)
        for j, text in enumerate(labels[:ncol]):
            draw.text(((pad + j * (w + pad)) * scale + 2, 2), text, fill=255)
        img = canvas
    return np.asarray(img)


