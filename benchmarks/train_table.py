"""The pure parts of ``bench_train.py``'s CUDA table: which rows it measures, which of them train as
``training=default`` does, and their MFU. No torch, no medgen: unit-tested on the CPU
(tests/unit/test_bench_helpers.py)."""

from __future__ import annotations

#: candidate settings (issue: "measure and keep only what pays"), each the default configuration plus
#: these overrides, measured as rows with ``--variants`` (compiled, at ``--variant-batch``)
VARIANTS = {
    "base": [],  # the default configuration itself, for comparison in the same process
    "channels_last": ["training.channels_last=true"],
    "cudagraphs": ["training.compile_mode=reduce-overhead"],
    "channels_last+cudagraphs": ["training.channels_last=true", "training.compile_mode=reduce-overhead"],
    "autotune": ["training.compile_mode=max-autotune-no-cudagraphs"],
    "heads64": ["model.num_head_channels=64"],  # 4 heads of 64 at 256 channels instead of 1 of 256
    "checkpointing": ["training.gradient_checkpointing=true"],  # volumes: recompute activations, less memory
}

#: peak dense bf16 TFLOP/s by card name: the first entry whose key is in the name (case-insensitive)
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0),
                    ("H200", 989.0), ("A100", 312.0))


def peak_tflops(gpu_name: str, override: float | None = None) -> float | None:
    """Peak dense bf16 TFLOP/s: ``override`` when given, else from the card's name; None if unknown."""
    if override is not None:
        return float(override)
    name = gpu_name.lower()
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key.lower() in name), None)


def mfu(flops_per_image: float, images_per_s: float | None, peak: float | None) -> float | None:
    """Model FLOP utilisation: achieved FLOP/s over the peak (None when either is unknown)."""
    if peak is None or images_per_s is None:
        return None
    return round(flops_per_image * images_per_s / (peak * 1e12), 4)


def plan(batches: list[int], compile_modes: list[bool], reference_batches: list[int],
         reference_precisions: list[str], default: tuple[int | None, bool], variants: list[str] = (),
         variant_batch: int = 64) -> list[dict]:
    """The table's configurations, smallest batch first (so a run out of memory comes late): medgen
    at each batch x compile mode, the reference at each reference batch x precision. The
    configuration ``training=default`` trains with (``default`` = (batch size, compiled)) is always
    in it, unless ``batches`` is empty (a table of variants only). Then the ``variants`` (names in :data:`VARIANTS`), compiled, at ``variant_batch``."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"bench_train: unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    rows = [{"step": "medgen", "batch": b, "compile": c} for b in batches for c in compile_modes]
    rows += [{"step": "reference", "batch": b, "precision": p} for b in reference_batches for p in reference_precisions]
    d_batch, d_compile = default
    if d_batch is not None and batches and not any(r["step"] == "medgen" and r["batch"] == d_batch and r["compile"] == d_compile
                                       for r in rows):
        rows.append({"step": "medgen", "batch": d_batch, "compile": d_compile})
    order = {"medgen": 0, "reference": 1}
    rows = sorted(rows, key=lambda r: (r["batch"], order[r["step"]], r.get("compile", False), r.get("precision", "")))
    return rows + [{"step": "medgen", "batch": variant_batch, "compile": True, "variant": v} for v in variants]


def is_default(row: dict, default: tuple[int | None, bool]) -> bool:
    """Whether ``row`` trains as ``training=default`` does (a compiled row whose compile failed and
    fell back to eager is not the compiled configuration)."""
    d_batch, d_compile = default
    return (row["step"] == "medgen" and row["compile"] == d_compile and (d_batch is None or row["batch"] == d_batch)
            and not row.get("compile_failed", False) and "variant" not in row)


def best_default_mfu(rows: list[dict], default: tuple[int | None, bool]) -> tuple[float | None, dict | None]:
    """(``"mfu"``, its row): the best MFU among the measured rows that train with the defaults."""
    candidates = [r for r in rows if is_default(r, default) and r.get("mfu") is not None and "error" not in r]
    if not candidates:
        return None, None
    best = max(candidates, key=lambda r: r["mfu"])
    return best["mfu"], best


def parse_batches(text: str) -> list[int]:
    """``"16,64,128"`` -> ``[16, 64, 128]``; ``"none"`` or ``""`` -> ``[]``."""
    if text.strip().lower() in ("", "none"):
        return []
    return [int(b) for b in text.split(",") if b.strip()]
