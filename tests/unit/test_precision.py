"""core/precision: bf16 autocast where the hardware computes bf16, fp32 (with one warning) where it only emulates it."""

from __future__ import annotations

import logging

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


def test_the_cpu_check_is_onednns_own():
    assert precision.cpu_has_native_bf16() == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_configure_backends_turns_tf32_on_for_training_and_generation(tf32_off):
    precision.configure_backends()
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
