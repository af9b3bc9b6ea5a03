"""Every benchmark script runs: each ``benchmarks/bench_*.py`` with ``--smoke`` (the same code path at
tiny sizes on the CPU) in a subprocess, exit code 0, and its last stdout line is the JSON its
docstring and the README promise, with sensible figures (slow: about 3 minutes on 2 cores;
``make test-slow``). The figures of a smoke run measure nothing; only that they are there and sane.

The subprocesses run with one thread (``OMP_NUM_THREADS=1``): their networks are tiny, and two
threads on a shared 2-core machine can make each forward tens of times slower.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
SAMPLERS = {"dpmpp_2m", "ddim", "ddpm", "euler", "heun"}


def _finite(value, low: float = 0.0, strict: bool = True) -> bool:
    """A real number, finite, above ``low`` (or at least ``low`` without ``strict``)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and (value > low if strict else value >= low))


def _share(value) -> bool:
    return _finite(value, 0.0, strict=False) and value <= 1.0


def check_attention(r: dict) -> None:
    assert r["benchmark"] == "attention" and r["device"] == "cpu" and r["gpu"] == "none (CPU)"
    assert r["tokens"] == [64, 16] and r["channels"] == 256 and r["batch"] == 1
    assert [(row["head_size"], row["heads"], row["tokens"]) for row in r["rows"]] == [
        (256, 1, 64), (256, 1, 16), (64, 4, 64), (64, 4, 16)]
    for row in r["rows"]:
        assert set(row) >= {"default", "flash", "efficient", "cudnn", "math"}
        assert _finite(row["default"]) and _finite(row["math"]), row  # the CPU always has these two
        assert all(_finite(row[k]) or isinstance(row[k], str) for k in ("flash", "efficient", "cudnn")), row
    assert set(r["default_ms_per_head_size"]) == {"256", "64"}
    assert all(_finite(v) for v in r["default_ms_per_head_size"].values())
    assert _finite(r["heads64_vs_heads256"])


def check_data(r: dict) -> None:
    assert r["benchmark"] == "data_first_batch" and r["mode"] == "bravo"
    assert r["subjects"] == 3 and r["volume"] == [32, 32, 16] and r["image_size"] == 16 and r["batch_size"] == 2
    for key in ("reference_s", "cold_s", "warm_s", "cold_2_workers_s",
                "warm_speedup", "cold_speedup", "cold_2_workers_speedup"):
        assert _finite(r[key]), (key, r[key])
    for key in ("reference_peak_mb", "cold_peak_mb", "warm_peak_mb", "warm_memory_ratio"):
        assert _finite(r[key], strict=False), (key, r[key])
    assert r["targets"] == {"warm_speedup": 20, "warm_memory_ratio": 0.25, "cold_2_workers_speedup": 1.8}
    assert isinstance(r["meets_targets"], bool)


def check_sample(r: dict) -> None:
    assert r["benchmark"] == "sample" and r["device"] == "cpu" and r["batch_size"] == 2 and r["network"] == "[16,32]"
    assert r["threads"] >= 1
    assert set(r["step_overhead"]) == SAMPLERS and all(_finite(v) for v in r["step_overhead"].values())
    for key in ("medgen_pairs_per_s", "spec_pairs_per_s", "speedup_vs_spec"):
        assert _finite(r[key]), (key, r[key])
    assert r["spec_steps_measured_per_stage"] == 2
    assert math.isclose(r["speedup_vs_spec"], r["medgen_pairs_per_s"] / r["spec_pairs_per_s"], rel_tol=0.1)
    assert r["targets"] == {"step_overhead": 1.05, "speedup_vs_spec": 40} and "cuda" not in r
    assert isinstance(r["meets_targets"], bool)


def _check_size_control(r: dict, model: str, target: str) -> None:
    assert r["model"] == model and r["target"] == target and r["candidates"] == 4
    assert set(r["steps"]) == {"unconditional", model} and all(s >= 2 for s in r["steps"].values())
    for key in ("exact_match_conditioned", "exact_match_unconditional", "empty_conditioned", "empty_unconditional"):
        assert _share(r[key]), (key, r[key])
    assert _finite(r["ratio"], strict=False)
    if r["exact_match_unconditional"] > 0:
        assert math.isclose(r["ratio"], r["exact_match_conditioned"] / r["exact_match_unconditional"])
    assert r["guidance"] == 1.0 and r["best_guidance"] in (1.0, 2.0)
    assert set(r["by_guidance"]) == {"1", "2"} and all(_share(v) for v in r["by_guidance"].values())
    assert r["by_guidance"]["1"] == r["exact_match_conditioned"]
    rano = {"tiny", "small", "medium", "large"}
    for key in ("per_bin_conditioned", "per_bin_unconditional"):
        assert r[key] and set(r[key]) <= rano and all(_share(v) for v in r[key].values()), (key, r[key])


def check_size_control(r: dict) -> None:
    _check_size_control(r, "conditioned", "real")
    assert not any(k.startswith("count_") for k in r)


def check_size_control_counts(r: dict) -> None:
    _check_size_control(r, "conditioned_counts", "uniform")
    assert set(r["per_bin_conditioned"]) == {"tiny", "small", "medium", "large"}  # uniform: every class asked
    for key in ("count_exact_match_conditioned", "count_exact_match_unconditional"):
        assert _share(r[key]), (key, r[key])
    for key in ("count_per_class_conditioned", "count_per_class_unconditional"):
        assert set(r[key]) == {"1", "2", "3", "4+"} and all(_share(v) for v in r[key].values()), (key, r[key])
    assert set(r["count_by_guidance"]) == {"1", "2"} and all(_share(v) for v in r["count_by_guidance"].values())


def _check_train_cpu(r: dict, benchmark: str, shape: list[int], target: float) -> None:
    assert r["benchmark"] == benchmark and r["mode"] == "bravo" and r["device"] == "cpu"
    assert r["shape"] == shape and r["network"] == [16, 32] and r["threads"] >= 1
    assert r["precision"] in ("bf16", "fp32") and r["batch_size"] >= 1
    for key in ("medgen_images_per_s", "reference_images_per_s", "speedup"):
        assert _finite(r[key]), (key, r[key])
    assert math.isclose(r["speedup"], r["medgen_images_per_s"] / r["reference_images_per_s"], rel_tol=0.05)
    assert r["target_speedup"] == target and r["meets_target"] == (r["speedup"] >= target)


def check_train(r: dict) -> None:
    _check_train_cpu(r, "train_step", [16, 16], 1.8)
    assert "step_peak_mib" not in r


def check_train_3d(r: dict) -> None:
    _check_train_cpu(r, "train_step_3d", [16, 16, 8], 1.5)
    assert _finite(r["step_peak_mib"]) and _finite(r["step_peak_mib_checkpointing"])
    assert math.isclose(r["memory_ratio_checkpointing"], r["step_peak_mib_checkpointing"] / r["step_peak_mib"],
                        rel_tol=0.05)


def check_train_table(r: dict) -> None:
    assert r["benchmark"] == "train_step" and r["device"] == "cpu" and r["gpu"] == "none (CPU)"
    assert r["shape"] == [16, 16] and r["network"] == [16, 32] and r["steps"] == 2
    assert _finite(r["flops_per_image"]) and r["peak_tflops"] is None and "MFU not computed" in r["note"]
    steps = {(row["step"], row["batch"], row.get("precision")) for row in r["rows"]}
    assert {("medgen", 2, None), ("reference", 2, "fp32"), ("reference", 2, "bf16")} <= steps
    for row in r["rows"]:
        assert "error" not in row and _finite(row["images_per_s"]) and row["mfu"] is None, row
    assert sum(row["default"] for row in r["rows"]) >= 1  # training=default's configuration is always measured
    assert r["mfu"] is None and r["mfu_row"] is None and r["target_mfu"] == 0.35 and r["meets_target"] is False
    assert _finite(r["seconds"])


def check_painters(r: dict) -> None:
    assert r["benchmark"] == "painters" and (r["size"], r["window"], r["train_steps"]) == (32, 16, 4)
    real, inserted = r["repainted_real_lesions"], r["inserted"]
    assert set(real) == {"inpaint", "repaint"} and set(inserted) == {"inpaint", "repaint", "copy"}
    for figures in real.values():
        assert _share(figures["mae"]) and figures["lesions"] == 4 and _finite(figures["lesion_contrast"])
    for figures in inserted.values():
        assert figures["samples"] == 4 and _finite(figures["seam"]) and _finite(figures["lesions_per_s"])
    assert r["mae_repaint_vs_inpaint"] == pytest.approx(real["repaint"]["mae"] / real["inpaint"]["mae"])
    assert r["seam_repaint_vs_inpaint"] == pytest.approx(inserted["repaint"]["seam"] / inserted["inpaint"]["seam"])


def _check_insert(r: dict, scan: list[int], window: list[int]) -> None:
    from medgen.diffusion.modes import MODES

    assert r["benchmark"] == "insert" and r["device"] == "cpu" and r["network"] == "[16,32]" and r["threads"] >= 1
    assert r["scan"] == scan and r["window"] == window and r["steps"] == 3 and r["batch_size"] == 2
    assert r["strategy"] == "rflow" and r["sampler"] == "euler" and r["timed"] == "whole generate() call"
    # the window painter: an inpaint model where the mode exists, else a bravo model of the window's size (repaint)
    assert r["painter"] == ("inpaint" if "inpaint" in MODES else "repaint")
    assert r["pairs"] == 2 and r["lesions"] == 2  # one new lesion painted into each of the 2 scans
    for key in ("lesions_per_s", "pairs_per_s", "ratio"):
        assert _finite(r[key]), (key, r[key])
    assert math.isclose(r["ratio"], r["lesions_per_s"] / r["pairs_per_s"], rel_tol=2e-3)
    assert len(r["lesions_per_s_runs"]) == len(r["pairs_per_s_runs"]) == 1  # --smoke: one timed run of each
    assert r["lesions_per_s_runs"] == [r["lesions_per_s"]] and r["pairs_per_s_runs"] == [r["pairs_per_s"]]
    assert r["goal"] == 5 and r["meets_goal"] == (r["ratio"] >= 5)


def check_insert(r: dict) -> None:
    _check_insert(r, [32, 32], [16, 16])


def check_insert_3d(r: dict) -> None:
    _check_insert(r, [32, 32, 16], [16, 16, 8])


#: id -> (script, extra arguments, check); ``{out}`` becomes a fresh folder
CASES = {
    "attention": ("bench_attention.py", [], check_attention),
    "data": ("bench_data.py", [], check_data),
    "insert": ("bench_insert.py", [], check_insert),
    "insert_3d": ("bench_insert.py", ["--3d"], check_insert_3d),
    "sample": ("bench_sample.py", [], check_sample),
    # the README's command that crashed in resolve_target (--target real), at smoke size
    "size_control": ("bench_size_control.py", ["--out", "{out}", "--target", "real", "--guidance", "1,2"],
                     check_size_control),
    "size_control_counts": ("bench_size_control.py", ["--out", "{out}", "--counts"], check_size_control_counts),
    "painters": ("bench_painters.py", ["--work", "{out}"], check_painters),
    "train": ("bench_train.py", [], check_train),
    "train_3d": ("bench_train.py", ["--3d"], check_train_3d),
    "train_table": ("bench_train.py", ["--table"], check_train_table),  # the CUDA table's code, on the CPU
}


@pytest.mark.parametrize("case", list(CASES))
def test_benchmark_smoke_run_prints_its_json_line(case, tmp_path):
    script, extra, check = CASES[case]
    args = [a.replace("{out}", str(tmp_path / "out")) for a in extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, str(BENCHMARKS / script), "--smoke", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    lines = run.stdout.strip().splitlines()
    assert lines, f"{script} printed nothing; stderr: {run.stderr[-2000:]}"
    check(json.loads(lines[-1]))


def test_every_benchmark_script_has_a_smoke_run():
    scripts = {p.name for p in BENCHMARKS.glob("bench_*.py")}
    covered = {script for script, _, _ in CASES.values()}
    assert scripts, BENCHMARKS
    assert scripts <= covered, f"benchmarks without a --smoke case in CASES: {sorted(scripts - covered)}"
    assert covered <= scripts, f"CASES name scripts that do not exist: {sorted(covered - scripts)}"
