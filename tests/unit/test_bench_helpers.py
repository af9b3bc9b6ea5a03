"""The benchmarks' pure parts, which the GPU figures rest on: the card's peak, MFU, the table's
configurations, the choice of ``"mfu"``, a configuration that runs out of memory, the targets."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # as when a script runs: its folder first (benchmarks/timing.py)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench_train = _load("bench_train")
bench_sample = _load("bench_sample")
bench_attention = _load("bench_attention")


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100-PCIE-40GB", 312.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA L4", None), ("none (CPU)", None)])
def test_the_peak_comes_from_the_card_name(name, peak):
    assert bench_train.peak_tflops(name) == peak
    assert bench_train.peak_tflops(name, override=100) == 100.0  # --peak-tflops wins


def test_mfu():
    # the figures measured before: 592.7 GFLOP per image at 501 images/s on a 989 TFLOP/s card
    assert bench_train.mfu(592.7e9, 501, 989.0) == pytest.approx(0.3002, abs=1e-4)
    assert bench_train.mfu(592.7e9, None, 989.0) is None  # the row failed
    assert bench_train.mfu(592.7e9, 501, None) is None  # unknown card


def test_the_plan_always_holds_the_default_configuration_smallest_batch_first():
    rows = bench_train.plan([128, 64], [False, True], [64], ["fp32", "bf16"], default=(16, True))
    assert [(r["step"], r["batch"], r.get("compile"), r.get("precision")) for r in rows] == [
        ("medgen", 16, True, None),  # added: what training=default does
        ("medgen", 64, False, None), ("medgen", 64, True, None),
        ("reference", 64, None, "bf16"), ("reference", 64, None, "fp32"),
        ("medgen", 128, False, None), ("medgen", 128, True, None)]
    eager_only = bench_train.plan([16], [False], [], [], default=(16, False))
    assert eager_only == [{"step": "medgen", "batch": 16, "compile": False}]
    assert bench_train.parse_batches("16, 64,128") == [16, 64, 128]
    assert bench_train.parse_batches("none") == []


def test_variants_are_extra_compiled_rows_that_never_count_as_the_default():
    rows = bench_train.plan([16], [True], [], [], default=(16, True), variants=["base", "channels_last"],
                            variant_batch=64)
    assert [(r["batch"], r["compile"], r.get("variant")) for r in rows] == [
        (16, True, None), (64, True, "base"), (64, True, "channels_last")]
    assert [bench_train.is_default(r, (16, True)) for r in rows] == [True, False, False]
    only = bench_train.plan([], [True], [], [], default=(16, True), variants=["heads64"])
    assert only == [{"step": "medgen", "batch": 64, "compile": True, "variant": "heads64"}]  # no default row
    with pytest.raises(SystemExit, match="unknown variant.*'fastest'"):
        bench_train.plan([16], [True], [], [], default=(16, True), variants=["fastest"])
    # each variant is the default configuration plus overrides that the config accepts
    from medgen.diffusion.config import load_config
    for name, overrides in bench_train.VARIANTS.items():
        load_config([*bench_train.SPEC, *overrides])


def test_mfu_is_the_best_row_that_trains_with_the_defaults():
    rows = [{"step": "medgen", "batch": 16, "compile": True, "mfu": 0.30},
            {"step": "medgen", "batch": 64, "compile": True, "mfu": 0.36},  # not the default batch
            {"step": "medgen", "batch": 16, "compile": False, "mfu": 0.20},  # not the default compile
            {"step": "reference", "batch": 16, "precision": "bf16", "mfu": 0.40}]
    assert bench_train.best_default_mfu(rows, (16, True)) == (0.30, rows[0])
    assert bench_train.best_default_mfu(rows, (None, True))[0] == 0.36  # a batch size decided at run time
    failed = [{"step": "medgen", "batch": 16, "compile": True, "error": "out of memory", "mfu": None},
              {"step": "medgen", "batch": 16, "compile": True, "compile_failed": True, "mfu": 0.2}]
    assert bench_train.best_default_mfu(failed, (16, True)) == (None, None)


def test_the_defaults_are_read_from_the_config():
    batch, compiled = bench_train.default_training(torch.device("cpu"))
    assert isinstance(batch, int) and batch > 0 and compiled is False  # compile=auto: eager on the CPU
    assert bench_train.default_training(torch.device("cuda"))[1] is True  # ... compiled on CUDA
    assert bench_train.default_training(torch.device("cpu"), ["training.batch_size=48"])[0] == 48


def test_a_configuration_that_fails_is_a_row_not_a_crash():
    cpu = torch.device("cpu")

    def oom(cfg):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    def wrapped_oom(cfg):  # what a compiler reports when the GPU ran out of memory while it worked
        raise RuntimeError("BackendCompilerFailed: RuntimeError: CUDA error: out of memory")

    def broken(cfg):
        raise ValueError("no such thing\nand a long trace")

    cfg = {"step": "medgen", "batch": 128, "compile": True}
    assert bench_train.measure(oom, cfg, cpu) == {**cfg, "error": "out of memory"}
    assert bench_train.measure(wrapped_oom, cfg, cpu)["error"] == "out of memory"
    assert bench_train.measure(broken, cfg, cpu)["error"] == "ValueError: no such thing"
    assert bench_train.measure(lambda c: {"images_per_s": 12.5}, cfg, cpu) == {**cfg, "images_per_s": 12.5}
    assert cfg == {"step": "medgen", "batch": 128, "compile": True}  # the plan's entry is left as it was


def test_sampling_targets_count_the_figures_there_are():
    cpu = {"step_overhead": {"euler": 1.01, "heun": 1.04}, "speedup_vs_spec": 55}
    assert bench_sample.meets_targets(cpu)
    assert not bench_sample.meets_targets({**cpu, "step_overhead": {"euler": 1.01, "heun": 1.2}})
    cuda = {"compiled_vs_eager_forward": 2.03, "projected_15000_pairs_min": 6.0}
    assert bench_sample.meets_targets({**cpu, "cuda": cuda})
    assert bench_sample.meets_targets({"cuda": cuda})  # --cuda-only
    assert not bench_sample.meets_targets({**cpu, "cuda": {**cuda, "compiled_vs_eager_forward": 1.9}})
    assert not bench_sample.meets_targets({"cuda": {**cuda, "projected_15000_pairs_min": 12}})


def test_an_attention_kernel_that_refuses_the_shapes_is_a_cell_saying_so():
    cpu = torch.device("cpu")
    timed = bench_attention.time_attention(1, 16, 32, 16, cpu, None, repeats=1)  # the default dispatch
    assert set(timed) == {"ms"} and timed["ms"] > 0
    refused = bench_attention.time_attention(1, 16, 32, 16, cpu, "cudnn", repeats=1)  # a CUDA-only kernel
    assert refused["error"].startswith("refused")


@pytest.mark.slow  # a benchmark in a subprocess (about 30 s), as the slow tier's smoke runs of every benchmark
def test_the_3d_table_measures_volumes_at_the_shape_it_is_given(tmp_path):
    """``bench_train.py --3d --table`` (the GPU section's table, here on the CPU at a tiny shape): one
    JSON line whose rows are volumes of that shape, FLOPs counted on a volume (not a slice), and the
    row training=default trains with (16 volumes) measured although the data hold fewer."""
    import json
    import subprocess

    out = subprocess.run([sys.executable, str(BENCHMARKS / "bench_train.py"), "--3d", "--table", "--batches", "1",
                          "--compile", "false", "--reference-batches", "none", "--steps", "1", "--warmup", "0",
                          "model.image_size=[16,16,8]", "model.channels=[32,32,32]", "model.num_head_channels=32"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "train_step_3d" and result["shape"] == [16, 16, 8]
    assert [(r["batch"], r["default"]) for r in result["rows"]] == [(1, False), (16, True)]
    assert all(r["images_per_s"] > 0 and "error" not in r for r in result["rows"])
    # a 3x3x3 convolution 32 -> 32 channels over the 16x16x8 grid alone is 2 * 27 * 32 * 32 * 2048 FLOPs forward
    assert result["flops_per_image"] > 3 * 2 * 27 * 32 * 32 * 16 * 16 * 8
