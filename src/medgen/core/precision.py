"""Mixed precision: the one autocast that training, validation and generation use.

``precision: bf16`` runs the network under bf16 autocast on CUDA and on CPUs with native bf16
arithmetic (AVX512-BF16 or AMX, read from the CPU's flags), where it is about twice as fast as fp32.
Other CPUs (most AMD processors, Intel before Cooper Lake, AVX-512 Xeons without AVX512-BF16) only
emulate bf16: on a 2-core AMD EPYC (AVX2) a training step of the ``cpu`` profile (bravo, 64 px,
batch 16) took 38.6 s under bf16 autocast against 1.8 s in fp32, 21 times slower; on an AVX-512
Xeon without AVX512-BF16, 2.8 s against 0.94 s (seg). So on such a CPU medgen computes in fp32 and says
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
    """Whether this CPU computes bf16 in hardware: on Linux its flags (x86: AVX512-BF16 or AMX; Arm:
    the bf16 extension), else oneDNN's own test. oneDNN's test alone says yes for every AVX-512 CPU,
    where bf16 is emulated: on 2 cores of an AVX-512 Xeon without AVX512-BF16 or AMX, a training step
    of the ``cpu`` profile (seg, 64 px, batch 16) took 2.8 s under bf16 autocast against 0.94 s in fp32."""
    flags = cpu_flags()
    if flags is not None:
        return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: assume it does, as autocast would
        return True


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """The instruction-set flags of the first CPU in ``cpuinfo`` (x86 ``flags``, Arm ``Features``),
    or None where there is no such file (not Linux) or line."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        return None
    return None


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
