"""Attention head size: which SDPA kernels take the specification network's attention, and how fast.

The specification's network (``model=default``: 128 px, channels [128, 256, 256], attention at the
two lower levels) attends over 64 x 64 = 4096 and 32 x 32 = 1024 tokens of 256 channels.
``model.num_head_channels=256`` (the specification) makes that one head of 256 channels; 64 makes
four heads of 64, the head size every fused kernel takes. Checkpoints load either way (the
projections have the same shapes), but the network computes something else, so a change of head
size is a change of model, to be made only if it pays.

For each head size and each level, forward + backward of ``scaled_dot_product_attention`` in bf16
at ``--batch`` (the layout MONAI's attention block uses: ``[B, heads, tokens, head size]``): with the
default dispatch (what the network gets) and restricted to each backend (flash, efficient, cudnn,
math), or the reason a backend refuses. ``"heads64_vs_heads256"``: the time of both levels with the
default dispatch at head size 256 over that at 64 (above 1: four heads of 64 are faster).

    python benchmarks/bench_attention.py [--batch 64] [--tokens 4096,1024] [--channels 256] [--heads 256,64]
On the CPU (a check of the script) use small sizes: --batch 2 --tokens 256,64. Prints one JSON line.
``--smoke``: that check at tiny sizes (batch 1, 64 and 16 tokens, 2 repeats; the same head sizes), on the CPU too.
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import smoke
from timing import median_time

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def time_attention(batch: int, tokens: int, channels: int, head_size: int, device: torch.device,
                   backend: str | None, repeats: int = 10) -> dict:
    """Median milliseconds of one forward + backward, or ``{"error": ...}`` when refused or out of memory."""
    try:
        return _time_attention(batch, tokens, channels, head_size, device, backend, repeats)
    finally:  # the tensors are gone with the call
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _time_attention(batch: int, tokens: int, channels: int, head_size: int, device: torch.device,
                    backend: str | None, repeats: int) -> dict:
    heads = channels // head_size
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, tokens, head_size, device=device, dtype=torch.bfloat16, generator=g)
               .requires_grad_() for _ in range(3))
    grad = torch.randn(batch, heads, tokens, head_size, device=device, dtype=torch.bfloat16, generator=g)

    def step():
        F.scaled_dot_product_attention(q, k, v).backward(grad)

    with warnings.catch_warnings(record=True) as why:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel([BACKENDS[backend]] if backend else list(BACKENDS.values())):
                # the warm-up run also meets the refusal, if the backend does not take these shapes
                return {"ms": round(1000 * median_time(step, device, repeats, warmup=True), 3)}
        except (RuntimeError, torch.OutOfMemoryError) as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            if "out of memory" in first.lower():
                return {"error": "out of memory"}
            if "no viable backend" in first.lower():  # torch says why in warnings, one per backend it tried
                reasons = [str(w.message).strip().splitlines()[0] for w in why
                           if "sdp" in str(w.message).lower() or "attention" in str(w.message).lower()]
                return {"error": "refused" + (f": {reasons[0][:200]}" if reasons else "")}
            return {"error": first[:200]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", default="4096,1024", help="tokens of each attention level (64x64 and 32x32 at 128 px)")
    ap.add_argument("--channels", type=int, default=256)
    ap.add_argument("--heads", default="256,64", help="head sizes (num_head_channels) to compare; the first is the reference")
    ap.add_argument("--repeats", type=int, default=10)
    smoke.add_flag(ap)
    args = smoke.apply(ap, ap.parse_args(), {"batch": 1, "tokens": "64,16", "repeats": 2})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokens = [int(t) for t in args.tokens.split(",")]
    head_sizes = [int(h) for h in args.heads.split(",")]
    result = {"benchmark": "attention", "device": str(device),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU)",
              "batch": args.batch, "channels": args.channels, "tokens": tokens, "rows": []}
    total = {}
    for head in head_sizes:
        total[head] = 0.0
        for n in tokens:
            row = {"head_size": head, "heads": args.channels // head, "tokens": n}
            for backend in (None, *BACKENDS):
                cell = time_attention(args.batch, n, args.channels, head, device, backend, args.repeats)
                row[backend or "default"] = cell.get("ms", cell.get("error"))
            if isinstance(row["default"], float):
                total[head] += row["default"]
            else:
                total[head] = float("nan")
            result["rows"].append(row)
    result["default_ms_per_head_size"] = {str(h): round(t, 3) for h, t in total.items()}
    ref = head_sizes[0]
    for head in head_sizes[1:]:
        result[f"heads{head}_vs_heads{ref}"] = round(total[ref] / total[head], 3) if total[head] else None
    print(json.dumps(result))


if __name__ == "__main__":
    main()
