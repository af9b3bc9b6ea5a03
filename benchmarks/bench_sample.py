"""Sampling speed: medgen's samplers and ``medgen-generate`` against a raw network forward and
against the specification's generation, in one process.

* ``step_overhead``: per sampler, time per network evaluation inside ``strategy.sample`` (the
  whole step: mode input, autocast, x0 conversion, solver arithmetic, per-sample noise) divided by
  one raw network forward under the same autocast, same batch. Heun evaluates the network twice
  per step, so it is reported per evaluation. Target <= 1.05.
* ``speedup_vs_spec``: pairs/s of the generation pipeline (``run_generation``: seg model then
  bravo model, its defaults: 25 steps of DPM-Solver++ 2M for the DDPM seg model and of Euler for
  the rectified-flow bravo model, bf16, EMA, files, previews; the quality gate off because the
  networks are untrained) against the specification's generation (1000-step DDPM per stage with
  MONAI's ``DDPMScheduler.step``, fp32, raw weights) on the same networks. The specification's
  per-step time is measured over ``--spec-steps`` steps per stage and multiplied by 1000 (every
  one of its steps costs the same). Target >= 40.
* On CUDA also ``cuda``: the specification's network (128 px, channels [128, 256, 256]) through
  the pipeline at ``--cuda-batch``: eager and compiled forwards/s of the bravo network (the
  compiled one is the denoiser generation samples with, bf16) and their ratio
  ``compiled_vs_eager_forward`` (target >= 2); the same compiled with CUDA graphs
  (``compile_mode=reduce-overhead``) as ``cudagraph_vs_eager_forward``; pairs/s of the pipeline eager and compiled over
  ``--cuda-pairs`` pairs (each after a warm-up run that compiles; 0: no pipeline runs), and the
  projected minutes for 15,000 pairs (target <= 10 on one H100/H200). ``--cuda-only``: only these.

Networks have random weights: speed does not depend on them. CPU: the ``training=cpu`` network
(64 px, [32, 64, 128]).

    python benchmarks/bench_sample.py [--batch 16] [--pairs 32] [--spec-steps 10] [--cuda-only] [--cuda-pairs 1024]
``--smoke``: the same with a 16 px network, batches of 2, 3 sampler steps (with ``--cuda-only`` on a CPU: minutes of compiling).
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

import smoke
from timing import median_time

CPU_MODEL = ["model.image_size=64", "model.channels=[32,64,128]", "model.attention_levels=[false,false,true]",
             "model.num_head_channels=32", "model.norm_num_groups=16"]
SPEC_MODEL = ["model.image_size=128", "model.channels=[128,256,256]", "model.attention_levels=[false,true,true]",
              "model.num_head_channels=256", "model.norm_num_groups=32"]


def make_checkpoint(path: Path, mode: str, strategy: str, model: list[str], seed: int = 0) -> Path:
    """A medgen checkpoint with random weights (and EMA = the same weights) for ``mode`` x ``strategy``."""
    from medgen.core.checkpoint import save_checkpoint
    from medgen.diffusion.config import load_config
    from medgen.diffusion.modes import build_mode
    from medgen.data.space import SampleSpace
    from medgen.diffusion.utils import build_network, network_kwargs

    cfg = load_config([f"mode={mode}", f"strategy={strategy}", "training.perceptual_weight=0", *model])
    kwargs = network_kwargs(cfg.model, build_mode(cfg), SampleSpace.from_config(cfg))
    torch.manual_seed(seed)
    net = build_network(kwargs)
    from omegaconf import OmegaConf

    state = net.state_dict()
    return save_checkpoint(path, {"config": OmegaConf.to_container(cfg, resolve=True), "mode": mode,
                                  "strategy": strategy, "network": kwargs, "model": state,
                                  "ema": {f"ema_model.{k}": v for k, v in state.items()}, "step": 0,
                                  "space": SampleSpace.from_config(cfg, (1.0, 1.0, 1.0)).state_dict(),
                                  # a mask model records its training slices' lesions (target=real): one of each
                                  # RANO-BM size class, 1 to 3 lesions, as stand-ins for these random weights
                                  **({"lesion_sizes": [5.0, 15.0, 25.0, 35.0], "lesion_counts": [1, 2, 1, 3]}
                                     if mode == "seg" else {})})


def step_overhead(tmp: Path, model: list[str], batch: int, steps: int, device: torch.device,
                  repeats: int = 5) -> dict[str, float]:
    """Per sampler: time per network evaluation in ``strategy.sample`` / one raw forward. The
    sampler run and a loop of as many raw forwards alternate ``repeats`` times (so drift in the
    machine's speed hits both alike); the ratio of their medians is reported."""
    from medgen.generation.models import load_stage

    out = {}
    for strategy in ("ddpm", "rflow"):
        stage = load_stage(make_checkpoint(tmp / f"{strategy}.pt", "bravo", strategy, model), "image", "bench",
                           device=device, compile="false")
        size, mode = stage.space.size, stage.mode
        # the mode's conditions (bravo: the mask and the brain), all -1 (model space), and the network's whole input
        cond = torch.zeros(batch, mode.in_channels - mode.out_channels, size, size, device=device) - 1
        x = torch.randn(batch, mode.in_channels, size, size, device=device)
        t_net = stage.strategy.network_timesteps(torch.full((batch,), 500.0, dtype=torch.float64, device=device))
        gens = [torch.Generator().manual_seed(i) for i in range(batch)]
        for name in stage.strategy.samplers:
            evals = 2 * steps - 1 if name == "heun" else steps

            def raw():
                with torch.no_grad(), stage.autocast():
                    for _ in range(evals):
                        stage.network(x, t_net)

            def sample():
                stage.sample(cond, gens, steps=steps, sampler=name)

            sample()  # warm-up
            t_raw, t_sample = [], []
            for _ in range(repeats):
                t_raw.append(median_time(raw, device, repeats=1))
                t_sample.append(median_time(sample, device, repeats=1))
            out[name] = round(statistics.median(t_sample) / statistics.median(t_raw), 3)
    return out


def spec_generation_seconds_per_pair(seg, image, batch: int, spec_steps: int, device: torch.device) -> float:
    """The specification's generation: 1000-step DDPM (MONAI DDPMScheduler.step), fp32, raw
    weights, for each stage; seconds per pair from ``spec_steps`` measured steps per stage."""
    from monai.networks.schedulers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, schedule="cosine")
    scheduler.set_timesteps(1000)
    size = seg.space.size
    per_pair = 0.0
    for stage in (seg, image):  # each stage's conditions: none for the mask model, the mask (and brain) for bravo
        x = torch.randn(batch, stage.mode.out_channels, size, size, device=device)
        cond = torch.zeros(batch, stage.mode.in_channels - stage.mode.out_channels, size, size, device=device)

        def steps():
            nonlocal x
            for t in scheduler.timesteps[:spec_steps]:
                with torch.no_grad():
                    out = stage.network(torch.cat([x, cond], 1), t.expand(batch).to(device))
                x, _ = scheduler.step(out, t, x)

        per_pair += median_time(steps, device, repeats=1) / spec_steps * 1000 / batch
    return per_pair


def pipeline_pairs_per_s(tmp: Path, seg_ckpt: Path, image_ckpt: Path, pairs: int, batch: int, device: torch.device,
                         compile: str = "false", name: str = "gen") -> float:
    from medgen.core.distributed import DistInfo
    from medgen.generation import generate_config, run_generation

    cfg = generate_config(seg_checkpoint=str(seg_ckpt), image_checkpoint=str(image_ckpt), num_images=pairs,
                          batch_size=batch, out_dir=str(tmp / name), gate={"enabled": False}, compile=compile,
                          device=str(device))
    result = run_generation(cfg, DistInfo(device=device), progress=False)
    if result.status != "done":
        raise SystemExit(f"bench_sample: the generation run was stopped ({result.status}); no figure")
    return pairs / result.seconds["total"]


#: step_overhead (the worst sampler's) and projected minutes: at most; the others: at least
TARGETS = {"step_overhead": 1.05, "speedup_vs_spec": 40, "compiled_vs_eager_forward": 2.0,
           "projected_15000_pairs_min": 10}


def meets_targets(result: dict) -> bool:
    """Every target that ``result`` has a figure for (the ``cuda`` ones only on CUDA)."""
    figures = {**result, **result.get("cuda", {})}
    checks = {"step_overhead": lambda v, t: max(v.values()) <= t, "projected_15000_pairs_min": lambda v, t: v <= t}
    return all(checks.get(k, lambda v, t: v >= t)(figures[k], target) for k, target in TARGETS.items() if k in figures)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--steps", type=int, default=25, help="sampler steps for step_overhead")
    ap.add_argument("--spec-steps", type=int, default=10, help="measured steps per stage of the spec's 1000")
    ap.add_argument("--cuda-batch", type=int, default=64)
    ap.add_argument("--cuda-pairs", type=int, default=1024, help="pairs per pipeline run on CUDA (0: no pipeline runs)")
    ap.add_argument("--cuda-only", action="store_true",
                    help="only the ``cuda`` figures (on a machine without CUDA: the same for the CPU network)")
    smoke.add_flag(ap)
    args = smoke.apply(ap, ap.parse_args(), {"batch": 2, "pairs": 2, "steps": 3, "spec_steps": 2, "cuda_batch": 2,
                                             "cuda_pairs": 2})
    from medgen.core.distributed import default_device
    from medgen.generation.models import load_stage

    device = default_device()
    model = smoke.TINY_MODEL if args.smoke else SPEC_MODEL if device.type == "cuda" else CPU_MODEL
    result: dict = {"benchmark": "sample", "device": str(device), "threads": torch.get_num_threads(),
                    "network": model[1].split("=")[1], "batch_size": args.batch}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        seg_ckpt = make_checkpoint(tmp / "seg.pt", "seg", "ddpm", model, seed=1)
        image_ckpt = make_checkpoint(tmp / "bravo.pt", "bravo", "rflow", model, seed=2)
        if not args.cuda_only:
            result["step_overhead"] = step_overhead(tmp, model, args.batch, args.steps, device,
                                                    repeats=2 if args.smoke else 5)
            medgen = pipeline_pairs_per_s(tmp, seg_ckpt, image_ckpt, args.pairs, args.batch, device)
            seg = load_stage(seg_ckpt, "seg", "seg", device=device, use_ema=False, precision="fp32", compile="false")
            image = load_stage(image_ckpt, "image", "image", device=device, use_ema=False, precision="fp32",
                               compile="false")
            spec = 1.0 / spec_generation_seconds_per_pair(seg, image, args.batch, args.spec_steps, device)
            result.update({"medgen_pairs_per_s": round(medgen, 3), "spec_pairs_per_s": round(spec, 5),
                           "spec_steps_measured_per_stage": args.spec_steps,
                           "speedup_vs_spec": round(medgen / spec, 1)})
        if device.type == "cuda" or args.cuda_only:
            result["cuda"] = cuda_figures(tmp, seg_ckpt, image_ckpt, args.cuda_batch, args.cuda_pairs, device)
    result["targets"] = {k: v for k, v in TARGETS.items() if k in result or k in result.get("cuda", {})}
    result["meets_targets"] = meets_targets(result)
    print(json.dumps(result))


def cuda_figures(tmp: Path, seg_ckpt: Path, image_ckpt: Path, batch: int, pairs: int, device: torch.device) -> dict:
    from medgen.diffusion.utils import sampling_forward
    from medgen.generation.models import load_stage

    out = {"gpu": torch.cuda.get_device_name() if device.type == "cuda" else str(device), "batch_size": batch}
    stage = load_stage(image_ckpt, "image", "image", device=device, compile="false")
    x = torch.randn(batch, stage.mode.in_channels, stage.space.size, stage.space.size, device=device)
    t = torch.full((batch,), 500.0, device=device)
    # the compiled forward is the one generation samples with (medgen.diffusion.utils.sampling_forward)
    # compiled with CUDA graphs (compile_mode=reduce-overhead): a candidate, measured beside the default
    for name, fn in (("eager", stage.network), ("compiled", sampling_forward(stage.network, device, "true")),
                     ("cudagraph", sampling_forward(stage.network, device, "true", mode="reduce-overhead"))):
        def forward():
            with torch.no_grad(), stage.autocast():
                for _ in range(20):
                    fn(x, t)

        out[f"{name}_forwards_per_s"] = round(20 * batch / median_time(forward, device), 1)
    out["compiled_vs_eager_forward"] = round(out["compiled_forwards_per_s"] / out["eager_forwards_per_s"], 2)
    out["cudagraph_vs_eager_forward"] = round(out["cudagraph_forwards_per_s"] / out["eager_forwards_per_s"], 2)
    if pairs <= 0:
        return out
    for compile in ("false", "true"):
        pipeline_pairs_per_s(tmp, seg_ckpt, image_ckpt, batch, batch, device, compile, name=f"warm_{compile}")
        rate = pipeline_pairs_per_s(tmp, seg_ckpt, image_ckpt, pairs, batch, device, compile, name=f"cuda_{compile}")
        label = "compiled" if compile == "true" else "eager"
        out[f"pipeline_pairs_per_s_{label}"] = round(rate, 1)
        out[f"projected_15000_pairs_min_{label}"] = round(15000 / rate / 60, 1)
    out["projected_15000_pairs_min"] = min(out["projected_15000_pairs_min_eager"],
                                          out["projected_15000_pairs_min_compiled"])
    return out


if __name__ == "__main__":
    main()
