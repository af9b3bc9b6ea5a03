"""Mixed precision: the one autocast that training, validation and generation use.

``precision: bf16`` runs the network under bf16 autocast on CUDA and on CPUs with native bf16
arithmetic (AVX512-BF16 or AMX, as oneDNN reports it), where it is about twice as fast as fp32.
Other CPUs (most AMD processors, Intel before Cooper Lake) only emulate bf16: on a 2-core AMD
EPYC (AVX2) a training step of the ``cpu`` profile (bravo, 64 px, batch 16) took 38.6 s under bf16
autocast against 1.8 s in fp32, 21 times slower. So on such a CPU medgen computes in fp32 and says
so once. ``precision: fp32`` is fp32 everywhere.

Process-wide backend flags are set in one place, :func:`configure_backends`, which every entry point
that trains or generates calls first (nothing else sets them, so a result does not depend on what
ran earlier in the process).
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from functools import lru_cache

import torch

log = logging.getLogger("medgen")


@lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (oneDNN's own test: AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: assume it does, as autocast would
        return True


@lru_cache(maxsize=None)
def _warn_emulated(capability: str) -> None:
    log.warning("precision=bf16: this CPU (%s) has no native bf16 (AVX512-BF16 or AMX), and emulated bf16 is many "
                "times slower than fp32, so the network computes in fp32 here; set precision=fp32 (training."
                "precision=fp32 for training) to say so and silence this", capability)


def effective_precision(device: torch.device, precision: str) -> str:
    """What ``precision`` computes in on ``device``: ``"bf16"`` or ``"fp32"``."""
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        _warn_emulated(torch.backends.cpu.get_cpu_capability())
        return "fp32"
    return precision


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """bf16 autocast on ``device`` when ``precision`` computes in bf16 there, else a no-op."""
    enabled = effective_precision(device, precision) == "bf16"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def configure_backends() -> None:
    """Set the process-wide backend flags medgen trains and generates with: TF32 tensor cores for
    fp32 matrix products and cuDNN convolutions on CUDA (no effect on a CPU)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
