"""The performance settings a GPU run may turn on (``training.channels_last``,
``training.compile_mode``, generation's ``compile_mode``): the same training, checkpoints that
load either way, a resume that changes them, and the settings reaching ``torch.compile``."""

from __future__ import annotations

import pytest
import torch

from medgen.core.distributed import DistInfo
from medgen.core.schema import ConfigError, compose_config
from medgen.diffusion import utils
from medgen.diffusion.trainer import DiffusionTrainer
from medgen.diffusion.utils import load_model_from_checkpoint, sampling_forward
from medgen.generation.config import validate_generate_config

CPU = DistInfo(device=torch.device("cpu"))
CL = torch.channels_last
#: fp32 so that the two layouts differ only by the order of the convolutions' sums
EXTRA = ("mode=bravo", "training.precision=fp32", "training.warmup_steps=1", "training.ema_update_after_step=0",
         "training.ema_update_every=1", "training.learning_rate=1e-3")


def _convs(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.dim() == 4]


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([v.detach().flatten() for v in module.state_dict().values()])


def _assert_same_training(a: torch.nn.Module, b: torch.nn.Module, start: torch.Tensor) -> None:
    """``a`` and ``b`` trained alike from the weights ``start``: the mean difference is a tiny
    fraction of how far training moved them. (Not the largest one: Adam moves a weight whose
    gradient is rounding noise by up to the learning rate either way. Moments paired with the wrong
    weights give a mean difference of a third of the movement.)"""
    moved = (_flat(b) - start).abs().mean().item()
    assert moved > 1e-4  # the run trained
    assert (_flat(a) - _flat(b)).abs().mean().item() < 1e-3 * moved


def test_channels_last_trains_as_the_default_layout_does(tiny_cfg, tmp_path, caplog):
    runs = {cl: DiffusionTrainer(tiny_cfg(*EXTRA, f"training.channels_last={cl}", "training.max_steps=6"),
                                 tmp_path / str(cl), CPU, progress=False) for cl in (False, True)}
    on, off = runs[True], runs[False]
    # converted once, before the EMA copy and the optimizer state existed: all of them channels_last
    assert all(p.is_contiguous(memory_format=CL) for p in _convs(on.model))
    assert sum(not p.is_contiguous() for p in _convs(on.model)) > 10  # 3x3 kernels (1x1 ones are both)
    assert all(p.is_contiguous(memory_format=CL) for p in _convs(on.ema.ema_model))
    assert all(p.is_contiguous() for p in _convs(off.model))
    start = _flat(off.model).clone()
    with caplog.at_level("INFO", logger="medgen.train"):
        for r in runs.values():
            assert r.train() == "max_steps"
    said = [r.getMessage() for r in caplog.records if "parameters on cpu" in r.getMessage()]
    assert [m.split("(fp32 x 1 process(es)), ")[1] for m in said] == ["eager", "eager, channels_last"]
    for p in _convs(on.model):
        state = on.optimizer.state[p]
        assert state["exp_avg"].stride() == state["exp_avg_sq"].stride() == p.stride()
    _assert_same_training(on.model, off.model, start)
    _assert_same_training(on.ema.ema_model, off.ema.ema_model, start)


@pytest.mark.parametrize("first, then", [(False, True), (True, False)])
def test_a_resume_may_switch_the_layout_and_continues_the_same_training(tiny_cfg, tmp_path, first, then):
    """The fused AdamW walks weights and moments as flat memory: moments loaded in the other layout
    would be paired with the wrong weights. They are given their weight's layout on loading."""
    straight = DiffusionTrainer(tiny_cfg(*EXTRA, "training.max_steps=6"), tmp_path / "a", CPU, progress=False)
    start = _flat(straight.model).clone()
    straight.train()
    half = DiffusionTrainer(tiny_cfg(*EXTRA, f"training.channels_last={first}", "training.max_steps=3"),
                            tmp_path / "b", CPU, progress=False)
    half.train()
    resumed = DiffusionTrainer(tiny_cfg(*EXTRA, f"training.channels_last={then}", "training.max_steps=6"),
                               tmp_path / "b", CPU, progress=False)
    resumed.resume_from(tmp_path / "b" / "checkpoints" / "latest.pt")  # the layout may change on resume
    for p in _convs(resumed.model):
        assert resumed.optimizer.state[p]["exp_avg"].stride() == p.stride()
    resumed.train()
    assert resumed.step == 6
    _assert_same_training(resumed.model, straight.model, start)
    _assert_same_training(resumed.ema.ema_model, straight.ema.ema_model, start)


def test_a_channels_last_checkpoint_is_an_ordinary_checkpoint(tiny_cfg, tmp_path):
    run = DiffusionTrainer(tiny_cfg(*EXTRA, "training.channels_last=true", "training.max_steps=2"), tmp_path / "r",
                           CPU, progress=False)
    run.train()
    model, _ = load_model_from_checkpoint(tmp_path / "r" / "checkpoints" / "latest.pt", use_ema=False)
    assert all(p.is_contiguous() for p in _convs(model))  # inference builds the plain network
    for (k, a), b in zip(model.state_dict().items(), run.model.state_dict().values()):
        assert torch.equal(a, b), k  # the same values, whatever the layout they were saved in


def test_the_compile_mode_reaches_torch_compile(tiny_cfg, tmp_path, monkeypatch):
    modes = []

    def recording_compile(module, mode=None, dynamic=None, **kwargs):
        modes.append(mode)
        return module

    monkeypatch.setattr(torch, "compile", recording_compile)
    DiffusionTrainer(tiny_cfg("mode=seg", "training.compile=true", "training.compile_mode=reduce-overhead"),
                     tmp_path / "a", CPU, progress=False)
    assert modes == ["reduce-overhead", "reduce-overhead"]  # the training step and the sample grids' denoiser
    modes.clear()
    DiffusionTrainer(tiny_cfg("mode=seg", "training.compile=true"), tmp_path / "b", CPU, progress=False)
    assert modes == [None, None]  # compile_mode=default: torch.compile's own default
    modes.clear()
    DiffusionTrainer(tiny_cfg("mode=seg", "training.compile_mode=max-autotune"), tmp_path / "c", CPU, progress=False)
    assert modes == []  # compile=auto on the CPU: eager, whatever the mode


def test_an_unknown_compile_mode_is_refused_naming_the_key(tiny_cfg):
    with pytest.raises(ConfigError, match=r"'training\.compile_mode'"):
        tiny_cfg("training.compile_mode=fastest")
    with pytest.raises(ConfigError, match=r"'compile_mode'"):
        validate_generate_config(compose_config(["image_checkpoint=x.pt", "compile_mode=turbo"], config_name="generate"))


def test_under_cuda_graphs_each_output_outlives_the_next_call(monkeypatch):
    """A CUDA-graph replay writes its output into the same memory every time; samplers keep earlier
    outputs (multistep solvers), so the compiled denoiser hands out copies."""
    network = torch.nn.Conv2d(2, 1, 3, padding=1)
    steps = []

    def graph_like_compile(module, mode=None, dynamic=None, **kwargs):
        buffer = {}

        def replay(x, t):
            out = module(x)
            buffer.setdefault("out", torch.empty_like(out)).copy_(out)
            return buffer["out"]  # the graph's static output

        return replay

    monkeypatch.setattr(torch, "compile", graph_like_compile)
    monkeypatch.setattr(utils, "uses_cuda_graphs", lambda mode, device: mode == "reduce-overhead")
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    x1, x2, t = torch.randn(2, 2, 8, 8), torch.randn(2, 2, 8, 8), torch.zeros(2)
    with torch.no_grad():
        fwd = sampling_forward(network, torch.device("cpu"), "true", mode="reduce-overhead")
        first = fwd(x1, t)
        fwd(x2, t)
        assert torch.equal(first, network(x1)) and len(steps) == 2
        plain = sampling_forward(network, torch.device("cpu"), "true", mode="default")  # no graphs: no copy
        first = plain(x1, t)
        plain(x2, t)
        assert torch.equal(first, network(x2))  # what the copy guards against
