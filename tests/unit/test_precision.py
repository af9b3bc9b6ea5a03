"""core/precision: bf16 autocast where the hardware computes bf16, fp32 (with one warning) where it only emulates it."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

import medgen.core.precision as precision


def _dtype_under(ctx) -> torch.dtype:
    a = torch.ones(4, 4)
    with ctx:
        return (a @ a).dtype


def test_bf16_autocast_only_on_a_cpu_that_computes_bf16(monkeypatch, caplog):
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.effective_precision(cpu, "bf16") == "bf16"
    assert _dtype_under(precision.autocast(cpu, "bf16")) == torch.bfloat16
    assert _dtype_under(precision.autocast(cpu, "fp32")) == torch.float32

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)  # an AVX2 CPU: bf16 is emulated
    precision._warn_emulated.cache_clear()
    with caplog.at_level(logging.WARNING, logger="medgen"):
        assert precision.effective_precision(cpu, "bf16") == "fp32"
        assert _dtype_under(precision.autocast(cpu, "bf16")) == torch.float32
        assert precision.effective_precision(cpu, "fp32") == "fp32"
    warnings = [r.getMessage() for r in caplog.records if "no native bf16" in r.getMessage()]
    assert len(warnings) == 1 and "computes in fp32 here; set precision=fp32" in warnings[0]  # said once


def test_the_cpu_check_reads_the_cpus_bf16_flags(tmp_path, monkeypatch):
    """AVX512-BF16 or AMX (Arm: bf16) in the CPU's flags; plain AVX-512, which oneDNN's own test also
    calls bf16-capable, is not (bf16 is emulated there, about 3 times slower than fp32)."""
    def cpuinfo(line: str) -> Path:
        path = tmp_path / f"cpuinfo{len(list(tmp_path.iterdir()))}"
        path.write_text(f"processor\t: 0\nmodel name\t: some CPU\n{line}\n\nprocessor\t: 1\n")
        return path

    cases = {"flags\t\t: fpu sse2 avx2 avx512f avx512bw": False, "flags\t\t: fpu avx512f avx512_bf16": True,
             "flags\t\t: fpu avx512f amx_tile amx_bf16": True, "flags\t\t: fpu sse2 avx2": False,
             "Features\t: fp asimd bf16 i8mm": True, "Features\t: fp asimd": False}
    read = precision.cpu_flags
    for line, native in cases.items():
        flags = read(str(cpuinfo(line)))
        monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
        precision.cpu_has_native_bf16.cache_clear()
        assert precision.cpu_has_native_bf16() is native, line
    assert read(str(tmp_path / "none")) is None
    # no cpuinfo (not Linux): oneDNN's test
    monkeypatch.setattr(precision, "cpu_flags", lambda: None)
    precision.cpu_has_native_bf16.cache_clear()
    assert precision.cpu_has_native_bf16() == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    precision.cpu_has_native_bf16.cache_clear()


def test_configure_backends_turns_tf32_on_for_training_and_generation(tf32_off):
    precision.configure_backends()
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
