"""DiffusionTrainer: exact resume, config-change refusal, NaN handling, LR schedule, logging files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from medgen.core.checkpoint import CheckpointError, load_checkpoint
from medgen.core.distributed import DistInfo
from medgen.diffusion.perceptual import PerceptualWeightsError
from medgen.diffusion.trainer import DiffusionTrainer, TrainingStopped
from medgen.diffusion.utils import load_model_from_checkpoint


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


#: bit-exact resume is checked on the CPU: cuDNN's backward kernels are not deterministic
CPU = DistInfo(device=torch.device("cpu"))
#: the CPU, and the GPU where the suite runs with MEDGEN_TEST_CUDA=1 (tests/conftest.py)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _weights_before_each_step(trainer: DiffusionTrainer, monkeypatch) -> dict[int, dict]:
    """{step: the weights just before that step}, filled while the trainer trains."""
    before: dict[int, dict] = {}
    original_step = trainer.train_step

    def spy(batch):
        before[trainer.step] = _weights(trainer.model)
        return original_step(batch)

    monkeypatch.setattr(trainer, "train_step", spy)
    return before


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_is_exact(tiny_cfg, tmp_path):
    """N steps straight == N/2 steps, stop, resume to N (model, EMA and optimizer state, bit for bit)."""
    extra = ("mode=bravo", "training.epochs=4", "training.warmup_steps=2", "training.cond_dropout=0.2",
             "training.ema_update_after_step=2", "training.val_interval=2")
    straight = DiffusionTrainer(tiny_cfg(*extra, "training.max_steps=9"), tmp_path / "a", CPU, progress=False)
    assert straight.steps_per_epoch == 6  # 9 steps end in the middle of epoch 2
    assert straight.train() == "max_steps" and straight.step == 9

    half = DiffusionTrainer(tiny_cfg(*extra, "training.max_steps=5"), tmp_path / "b", CPU, progress=False)
    assert half.train() == "max_steps" and half.step == 5
    resumed = DiffusionTrainer(tiny_cfg(*extra, "training.max_steps=9"), tmp_path / "b", CPU, progress=False)
    resumed.resume_from(tmp_path / "b" / "checkpoints" / "latest.pt")
    assert resumed.step == 5 and resumed.epoch == 0  # stopped mid-epoch
    resumed.train()
    assert resumed.step == 9
    _assert_same(_weights(straight.model), _weights(resumed.model))
    _assert_same(_weights(straight.ema.ema_model), _weights(resumed.ema.ema_model))
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for k in sa:
        assert torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"])
    # and the run really moved: not trivially equal to the initial weights
    fresh = DiffusionTrainer(tiny_cfg(*extra), tmp_path / "c", CPU, progress=False)
    assert any(not torch.equal(v, fresh.model.state_dict()[k]) for k, v in straight.model.state_dict().items())


def test_fit_runs_the_steps_train_runs_and_stops_when_asked(tiny_cfg, tmp_path):
    """fit(): the same weights as train() for the same steps, also split over calls and across an
    epoch boundary; on_step sees every step and a true return stops."""
    extra = ("mode=bravo", "training.epochs=4", "training.warmup_steps=2", "training.cond_dropout=0.2")
    trained = DiffusionTrainer(tiny_cfg(*extra, "training.max_steps=8"), tmp_path / "a", CPU, progress=False)
    assert trained.steps_per_epoch == 6 and trained.train() == "max_steps"
    fitted = DiffusionTrainer(tiny_cfg(*extra), tmp_path / "b", CPU, progress=False)
    assert fitted.fit(5) == 5 and fitted.fit(3) == 3 and fitted.step == 8 and fitted.epoch == 1
    _assert_same(_weights(trained.model), _weights(fitted.model))
    assert not (tmp_path / "b").exists()  # no checkpoints, logs or samples

    stopped = DiffusionTrainer(tiny_cfg(*extra), tmp_path / "c", CPU, progress=False)
    losses: list[float] = []

    def on_step(result) -> bool:
        losses.append(float(result.loss))
        return stopped.step == 3

    assert stopped.fit(10, on_step) == 3 and stopped.step == 3
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)


def test_building_a_trainer_leaves_process_wide_state_alone(tiny_cfg, tmp_path, tf32_off):
    """The initial weights depend on the seed only, and the global RNG and the TF32 flags are the
    same after building a trainer as before."""
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    first = DiffusionTrainer(tiny_cfg("mode=seg"), tmp_path / "a", CPU, progress=False)
    assert torch.equal(torch.get_rng_state(), rng)
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    torch.manual_seed(7)
    second = DiffusionTrainer(tiny_cfg("mode=seg"), tmp_path / "b", CPU, progress=False)
    _assert_same(_weights(first.model), _weights(second.model))
    other_seed = DiffusionTrainer(tiny_cfg("mode=seg", "seed=1"), tmp_path / "c", CPU, progress=False)
    assert any(not torch.equal(v, other_seed.model.state_dict()[k]) for k, v in first.model.state_dict().items())


def test_resume_with_changed_config_is_refused_naming_the_key(tiny_cfg, tmp_path):
    run = DiffusionTrainer(tiny_cfg("mode=bravo", "training.max_steps=2"), tmp_path / "r", progress=False)
    run.train()
    changed = DiffusionTrainer(tiny_cfg("mode=bravo", "training.learning_rate=3e-4"), tmp_path / "r", progress=False)
    with pytest.raises(CheckpointError) as info:
        changed.resume_from(tmp_path / "r" / "checkpoints" / "latest.pt")
    assert "training.learning_rate: 0.0001 -> 0.0003" in str(info.value)
    # allowed keys (epochs, max_steps, val_interval, log_every) may change
    ok = DiffusionTrainer(tiny_cfg("mode=bravo", "training.epochs=5", "training.max_steps=4", "training.log_every=3",
                                   "training.val_interval=2"), tmp_path / "r", progress=False)
    ok.resume_from(tmp_path / "r" / "checkpoints" / "latest.pt")
    assert ok.step == 2


def test_non_finite_loss_skips_the_step_and_k_in_a_row_stop(tiny_cfg, tmp_path, monkeypatch):
    trainer = DiffusionTrainer(tiny_cfg("mode=seg", "training.max_nonfinite_steps=3", "training.epochs=10"),
                               tmp_path / "n", progress=False)
    real_target = trainer.strategy.target
    poisoned = {2, 5, 6, 7}  # one isolated NaN step, then three in a row

    def target(x0, noise, t):
        out = real_target(x0, noise, t)
        return out * float("nan") if trainer.step in poisoned else out

    monkeypatch.setattr(trainer.strategy, "target", target)
    before = _weights_before_each_step(trainer, monkeypatch)
    with pytest.raises(TrainingStopped, match="3 non-finite losses in a row, the last at step 7"):
        trainer.train()
    _assert_same(before[2], before[3])  # the NaN step changed nothing
    assert any(not torch.equal(before[3][k], before[4][k]) for k in before[3])  # normal steps do
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values())


def test_lr_schedule_warmup_then_cosine_independent_of_max_steps(tiny_cfg, tmp_path):
    a = DiffusionTrainer(tiny_cfg("mode=seg", "training.epochs=10", "training.warmup_steps=4",
                                  "training.learning_rate=1e-3"), tmp_path / "a", progress=False)
    b = DiffusionTrainer(tiny_cfg("mode=seg", "training.epochs=10", "training.warmup_steps=4",
                                  "training.learning_rate=1e-3", "training.max_steps=3"), tmp_path / "b", progress=False)
    total = 10 * a.steps_per_epoch
    assert total >= 40 and a.warmup_steps == 4
    lr = a.lr_schedule
    assert lr(0) == pytest.approx(1e-3 / 4)
    assert lr(3) == pytest.approx(1e-3)
    mid = 4 + (total - 4) // 2
    assert lr(mid) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * (mid - 4) / (total - 4))))
    assert lr(total) == pytest.approx(0.0, abs=1e-12)
    assert [lr(k) for k in range(total)] == [b.lr_schedule(k) for k in range(total)]


def test_warmup_is_capped_at_a_tenth_of_a_short_run(tiny_cfg, tmp_path, caplog):
    """The specification's quick debug run (2 epochs) with the default 1000 warm-up steps: the
    warm-up shrinks to 10% of the run and says so, instead of refusing the config."""
    with caplog.at_level("INFO", logger="medgen.train"):
        trainer = DiffusionTrainer(tiny_cfg("training.epochs=2", "training.warmup_steps=1000"), tmp_path / "w",
                                   progress=False)
    total = 2 * trainer.steps_per_epoch
    assert trainer.warmup_steps == int(0.1 * total) < 1000
    assert "warm-up capped" in caplog.text and "training.warmup_steps=1000" in caplog.text
    assert trainer.lr_schedule(total - 1) > 0


def test_without_a_terminal_progress_is_a_log_line_not_a_bar(tiny_cfg, tmp_path, monkeypatch, caplog, capsys):
    """A SLURM job's log is a file: a bar's carriage returns would fill it with fragments."""
    import medgen.diffusion.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "PROGRESS_LINE_SECONDS", 0.0)
    monkeypatch.setattr(trainer_module.sys.stderr, "isatty", lambda: False, raising=False)
    with caplog.at_level("INFO", logger="medgen.train"):
        trainer = DiffusionTrainer(tiny_cfg("training.max_steps=4", "training.log_every=2"), tmp_path / "p")
        trainer.train()
    lines = [r.getMessage() for r in caplog.records if ": loss " in r.getMessage()]
    assert [line.split(":")[0] for line in lines] == [f"epoch 1/{trainer.train_cfg.epochs}, step 2/{trainer.total_steps}",
                                                      f"epoch 1/{trainer.train_cfg.epochs}, step 4/{trainer.total_steps}"]
    assert "images/s" in lines[0] and "\r" not in capsys.readouterr().err


def test_run_folder_files_and_tensorboard_tags(tiny_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    trainer = DiffusionTrainer(tiny_cfg("mode=dual", "training.epochs=2", "training.val_interval=1"), run, progress=False)
    assert trainer.train() == "done"
    ck = run / "checkpoints"
    assert {p.name for p in ck.iterdir()} >= {"latest.pt", "best.pt", "epoch_0001.pt", "epoch_0002.pt"}
    latest = load_checkpoint(ck / "latest.pt")
    assert latest["step"] == trainer.step and latest["mode"] == "dual" and latest["strategy"] == "ddpm"
    assert latest["network"]["in_channels"] == 4 and latest["data_fingerprint"] == trainer.data.fingerprint  # + mask, brain
    assert load_checkpoint(ck / "best.pt")["best_val_loss"] == pytest.approx(trainer.best_val_loss)
    grid = Image.open(run / "samples" / "epoch_0002.png")
    # rows = num_val_samples (2); columns: mask, brain, 2 real, 2 generated; 16 px tiles, 2 px gaps, drawn at
    # 2x, under a 14 px header naming the columns
    assert grid.size == (2 * (6 * 18 + 2), 2 * (2 * 18 + 2) + 14)
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in l for l in lines) and any("images_per_sec" in l for l in lines)

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"loss/total", "loss/mse", "loss/perceptual", "train/lr", "train/grad_norm", "perf/images_per_sec",
            "perf/peak_memory_mb", "val/loss"} <= scalars
    assert any(t.startswith("loss_by_timestep/bin_") for t in scalars)
    assert "samples" in acc.Tags()["images"]


def test_inference_model_builds_from_checkpoint_alone_with_ema_weights(tiny_cfg, tmp_path):
    trainer = DiffusionTrainer(tiny_cfg("mode=bravo", "training.max_steps=4", "training.ema_decay=0.5"),
                               tmp_path / "r", progress=False)
    trainer.train()
    model, ckpt = load_model_from_checkpoint(tmp_path / "r" / "checkpoints" / "latest.pt")
    _assert_same(_weights(model), _weights(trainer.ema.ema_model))
    raw, _ = load_model_from_checkpoint(tmp_path / "r" / "checkpoints" / "latest.pt", use_ema=False)
    _assert_same(_weights(raw), _weights(trainer.model))
    assert not model.training


def test_missing_perceptual_weights_stop_before_any_step(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    with pytest.raises(PerceptualWeightsError) as info:
        DiffusionTrainer(tiny_cfg("mode=bravo", "training.perceptual_weight=0.001"), tmp_path / "p", progress=False)
    msg = str(info.value)
    assert "training.perceptual_weights_path" in msg and "perceptual_weight=0" in msg
    assert not (tmp_path / "p").exists()  # nothing trained, nothing written
    # seg mode never uses the perceptual loss, so the same setting is fine there
    DiffusionTrainer(tiny_cfg("mode=seg", "training.perceptual_weight=0.001"), tmp_path / "s", progress=False)


def test_validation_shards_cover_every_slice_once_for_any_world_size(tiny_cfg, tmp_path, monkeypatch):
    """Each rank's (loss sum, count) share, summed as the all-reduce does, gives the one-process
    value, also when the world size does not divide the number of validation slices."""
    from medgen.diffusion import validation

    trainer = DiffusionTrainer(tiny_cfg("mode=bravo", "training.max_steps=2"), tmp_path / "v", progress=False)
    trainer.train()
    single = trainer.validation_loss()
    n = len(trainer.data.val_cache)
    world = 4
    assert n % world != 0 and math.isfinite(single)
    shares = []
    monkeypatch.setattr(validation.torch_dist, "all_reduce", lambda total: shares.append(total.clone()))
    for rank in range(world):
        trainer.dist = DistInfo(rank=rank, world_size=world, device=trainer.device)
        trainer.validation_loss()
    total = sum(shares)
    assert total[1] == n  # every slice counted exactly once
    assert float(total[0] / total[1]) == pytest.approx(single, rel=1e-6)


def test_compile_auto_is_eager_on_the_cpu(tiny_cfg, tmp_path):
    trainer = DiffusionTrainer(tiny_cfg("mode=seg"), tmp_path / "a", progress=False)
    assert trainer.cfg.training.compile == "auto"  # the default
    assert trainer.forward_model is trainer.model and not trainer._compile_pending
    assert trainer._sample_forward is trainer.ema.ema_model  # the sample grids call the plain EMA network


@pytest.mark.parametrize("device", DEVICES)
def test_a_compiled_sample_grid_equals_the_eager_one(tiny_cfg, tmp_path, caplog, device):
    """training.compile=true: the grids' denoiser (the EMA network) is compiled once for the run, and
    sees the EMA weights as they are at each grid; the pictures match the eager run's up to bf16
    rounding (about half a minute on two cores, most of it compiling)."""
    dist = DistInfo(device=torch.device(device))
    runs = {c: DiffusionTrainer(tiny_cfg("mode=bravo", "strategy=rflow", "training.precision=bf16",
                                         f"training.compile={c}"), tmp_path / c, dist, progress=False)
            for c in ("false", "true")}

    def set_weights(scale: float) -> None:  # in place, as an EMA update does (MONAI zero-inits the output
        # layer; random weights make the velocity, and so the pictures, depend on the network)
        with torch.no_grad():
            for r in runs.values():
                g = torch.Generator().manual_seed(0)
                for p in r.ema.ema_model.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * scale)

    with caplog.at_level("INFO", logger="medgen.train"):
        set_weights(0.05)
        first = {c: r.sample_grid() for c, r in runs.items()}
        set_weights(0.1)
        second = {c: r.sample_grid() for c, r in runs.items()}
    assert [r.getMessage().startswith("compiled the sampling network in ") for r in caplog.records].count(True) == 1
    for grids in (first, second):
        diff = np.abs(grids["true"].astype(int) - grids["false"].astype(int))
        assert diff.max() <= 2 and diff.mean() < 0.05  # a level or two at a few pixels, from bf16 rounding
    assert not np.array_equal(first["true"], second["true"])  # the new weights were used


def test_a_compiler_error_falls_back_to_eager_with_one_warning(tiny_cfg, tmp_path, monkeypatch, caplog):
    def broken_compile(module, **kwargs):
        def fail(*args, **kw):
            raise RuntimeError("backend exploded\nlong compiler trace")
        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    compiled = DiffusionTrainer(tiny_cfg("mode=seg", "training.compile=true", "training.max_steps=3"), tmp_path / "c",
                                progress=False)
    eager = DiffusionTrainer(tiny_cfg("mode=seg", "training.compile=false", "training.max_steps=3"), tmp_path / "e",
                             progress=False)
    with caplog.at_level("WARNING", logger="medgen.train"):
        assert compiled.train() == eager.train() == "max_steps"
    warnings = [r.getMessage() for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert warnings == ["torch.compile failed (RuntimeError: backend exploded); training eagerly"]
    _assert_same(_weights(compiled.model), _weights(eager.model))  # the failed first step was redone exactly


def _poison(trainer: DiffusionTrainer, steps: set[int], monkeypatch) -> None:
    real_target = trainer.strategy.target
    monkeypatch.setattr(trainer.strategy, "target", lambda x0, eps, t: real_target(x0, eps, t) * (
        float("nan") if trainer.step in steps else 1.0))


def test_the_device_side_skip_equals_a_host_decided_skip(tiny_cfg, tmp_path, monkeypatch):
    """The step decides a skip on the device (fused AdamW's found_inf); the same run with the
    plain foreach AdamW, whose skip the host decides by reading the flag, ends with the same losses
    and weights (up to the fused kernel's float rounding)."""
    cfg = tiny_cfg("mode=bravo", "training.use_ema=false", "training.epochs=10")
    fused = DiffusionTrainer(cfg, tmp_path / "f", progress=False)
    host = DiffusionTrainer(cfg, tmp_path / "h", progress=False)
    host.optimizer = torch.optim.AdamW(host.model.parameters(), lr=cfg.training.learning_rate,
                                       weight_decay=cfg.training.weight_decay, foreach=True)
    plain_step = host.optimizer.step

    def host_decided_step():
        if not bool(host.optimizer.__dict__.pop("found_inf")):  # the host waits for the flag here
            plain_step()

    monkeypatch.setattr(host.optimizer, "step", host_decided_step)
    for trainer in (fused, host):
        _poison(trainer, {2}, monkeypatch)
    batch = next(iter(fused.data.train))
    for _ in range(6):
        a, b = fused.train_step(batch), host.train_step(batch)
        assert bool(a.skipped) == bool(b.skipped) == (fused.step == 2)
        if not a.skipped:
            assert float(a.loss) == pytest.approx(float(b.loss), rel=1e-5)
        fused.step += 1
        host.step += 1
    for k, v in _weights(fused.model).items():
        torch.testing.assert_close(v, _weights(host.model)[k], rtol=1e-4, atol=1e-5)
    assert int(fused.optimizer.state[next(fused.model.parameters())]["step"]) == 5  # the skipped step not counted


def test_the_step_reads_nothing_back_from_the_device(tiny_cfg, tmp_path):
    """No item()/_local_scalar_dense in a training step outside the optimizer: the host never waits
    on the accelerator. (On the CPU the fused AdamW reads its own step counter, a CPU tensor; on CUDA
    it reads nothing. EMA's counters are CPU tensors: reading them never waits on a GPU.)"""
    from torch.profiler import ProfilerActivity, profile

    trainer = DiffusionTrainer(tiny_cfg("mode=bravo", "training.use_ema=false"), tmp_path / "p", progress=False)
    batch = next(iter(trainer.data.train))
    trainer.train_step(batch)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            trainer.train_step(batch)
            trainer.step += 1

    def in_optimizer(event) -> bool:
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("Optimizer.step"):
            parent = parent.cpu_parent
        return parent is not None

    reads = [e for e in prof.events() if e.name in ("aten::item", "aten::_local_scalar_dense")]
    assert reads and all(in_optimizer(e) for e in reads)
    with_ema = DiffusionTrainer(tiny_cfg("mode=bravo"), tmp_path / "e", progress=False)
    assert with_ema.ema.step.device.type == "cpu" and with_ema.ema.initted.device.type == "cpu"


@pytest.mark.cuda
@pytest.mark.parametrize("compile", ["false", "true"])
def test_the_step_never_waits_on_the_gpu(tiny_cfg, tmp_path, compile):
    """On CUDA, training steps (EMA, the non-finite skip and the loss bins included) run with CUDA's
    synchronisation check set to raise: no operation in them makes the host wait for the GPU."""
    trainer = DiffusionTrainer(tiny_cfg("mode=bravo", "training.precision=bf16", f"training.compile={compile}"),
                               tmp_path / "s", DistInfo(device=torch.device("cuda")), progress=False)
    batch = next(iter(trainer.data.train))
    for _ in range(2):  # compiling, lazy CUDA initialisation
        trainer._first_compiled_step(batch) if trainer._compile_pending else trainer.train_step(batch)
        trainer.step += 1
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            trainer.train_step(batch)
            trainer.step += 1
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert trainer.forward_model is not trainer._eager_forward or compile == "false"  # no compile fallback


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_a_nan_step_is_skipped_in_a_compiled_run_too(tiny_cfg, tmp_path, monkeypatch, caplog, device):
    """torch.compile (inductor) with the device-side skip: the NaN step leaves the weights as they
    were, the others change them (slow: about a minute of compiling on the CPU)."""
    trainer = DiffusionTrainer(tiny_cfg("mode=bravo", "training.compile=true", "training.max_steps=5"),
                               tmp_path / "c", DistInfo(device=torch.device(device)), progress=False)
    _poison(trainer, {2}, monkeypatch)
    before = _weights_before_each_step(trainer, monkeypatch)
    with caplog.at_level("INFO", logger="medgen.train"):
        assert trainer.train() == "max_steps"
    assert type(trainer.forward_model).__name__ == "OptimizedModule"  # it did compile, no fallback
    assert any(r.getMessage().startswith("compiled the training step in ") for r in caplog.records)
    _assert_same(before[2], before[3])
    assert any(not torch.equal(before[3][k], before[4][k]) for k in before[3])
    assert "1 step(s) skipped since the last report: non-finite loss or gradient (the last at step 2)" in caplog.text


def _stopped_at_2_and_resumed_to_4(tiny_cfg, extra: tuple[str, ...], folder) -> DiffusionTrainer:
    """A run of ``extra`` that stops after 2 steps, then is resumed from its checkpoint to step 4."""
    DiffusionTrainer(tiny_cfg(*extra, "training.max_steps=2"), folder, CPU, progress=False).train()
    resumed = DiffusionTrainer(tiny_cfg(*extra, "training.max_steps=4"), folder, CPU, progress=False)
    resumed.resume_from(folder / "checkpoints" / "latest.pt")
    resumed.train()
    assert resumed.step == 4
    return resumed


def test_a_3d_model_trains_on_whole_volumes_and_resumes_exactly(tiny_cfg, tmp_path):
    """model.image_size=[X, Y, Z]: the volume cache feeds [B, C, X, Y, Z] batches to a 3D U-Net; the
    checkpoint records the shape; N steps straight == N/2, stop, resume to N, bit for bit."""
    extra = ("mode=bravo", "strategy=rflow", "model.image_size=[16,16,8]",
             "training.batch_size=2", "training.epochs=4", "training.warmup_steps=1", "training.val_interval=1")
    straight = DiffusionTrainer(tiny_cfg(*extra, "training.max_steps=4"), tmp_path / "a", CPU, progress=False)
    assert straight.data.train_cache.data.shape[1:] == (3, 16, 16, 8)  # bravo, seg, brain: one volume per patient
    batch = next(iter(straight.data.train))
    assert batch["bravo"].shape == (2, 1, 16, 16, 8) and set(batch) >= {"bravo", "seg", "brain"}
    assert type(straight.model.conv_in.conv).__name__ == "Conv3d" and straight.space.shape == (16, 16, 8)
    assert straight.train() == "max_steps" and straight.step == 4
    ckpt = load_checkpoint(tmp_path / "a" / "checkpoints" / "latest.pt")
    assert ckpt["network"]["spatial_dims"] == 3 and ckpt["config"]["model"]["image_size"] == [16, 16, 8]
    assert ckpt["space"]["shape"] == [16, 16, 8] and len(ckpt["space"]["spacing"]) == 3
    grids = sorted((tmp_path / "a" / "samples").glob("*.png"))
    assert grids and Image.open(grids[-1]).size[0] > 0  # the middle axial slice of each volume

    _assert_same(_weights(straight.model), _weights(_stopped_at_2_and_resumed_to_4(tiny_cfg, extra, tmp_path / "b").model))


def test_gradient_checkpointing_recomputes_the_blocks_and_trains_the_same_weights(tiny_cfg, tmp_path):
    extra = ("mode=bravo", "strategy=rflow", "model.image_size=[16,16,8]",
             "training.batch_size=2", "training.max_steps=3", "training.val_interval=100")
    plain = DiffusionTrainer(tiny_cfg(*extra), tmp_path / "a", CPU, progress=False)
    saving = DiffusionTrainer(tiny_cfg(*extra, "training.gradient_checkpointing=true"), tmp_path / "b", CPU,
                              progress=False)
    assert type(saving.model.down_blocks[0]).__name__.startswith("Checkpointed")
    assert type(saving.ema.ema_model.up_blocks[0]).__name__.startswith("Checkpointed")  # the EMA copy is one too
    assert saving.model.state_dict().keys() == plain.model.state_dict().keys()
    calls = {"plain": 0, "saving": 0}
    for name, trainer in (("plain", plain), ("saving", saving)):
        def count(*_, name=name):
            calls[name] += 1
        trainer.model.down_blocks[0].resnets[0].register_forward_hook(count)
        trainer.train()
    assert calls["saving"] == 2 * calls["plain"] > 0  # each step's forward, then its recomputation in backward
    _assert_same(_weights(plain.model), _weights(saving.model))


def test_a_3d_image_model_trains_with_the_2_5d_perceptual_loss_and_resumes_exactly(tiny_cfg, tmp_path,
                                                                                    reference_state):
    """training.perceptual_weight > 0 on volumes: the loss scores slices of the three planes (it is
    logged and not zero) and, its slices drawn from the step's generator, a stopped and resumed run
    ends with the weights of a straight one."""
    torch.save(reference_state, tmp_path / "radimagenet.pth")
    extra = ("mode=bravo", "strategy=rflow", "model.image_size=[16,16,8]",
             "training.batch_size=2", "training.epochs=4", "training.warmup_steps=1", "training.val_interval=100",
             "training.perceptual_weight=0.5", f"training.perceptual_weights_path={tmp_path / 'radimagenet.pth'}",
             "training.perceptual_slices=3")
    straight = DiffusionTrainer(tiny_cfg(*extra, "training.max_steps=4"), tmp_path / "a", CPU, progress=False)
    assert type(straight.perceptual).__name__ == "PlanesPerceptualLoss" and straight.perceptual.slices == 3
    results = []
    straight.fit(4, results.append)
    assert all(r.perceptual.item() > 0 for r in results)
    assert all(r.loss.item() == pytest.approx(r.mse.item() + 0.5 * r.perceptual.item(), rel=1e-5) for r in results)

    _assert_same(_weights(straight.model), _weights(_stopped_at_2_and_resumed_to_4(tiny_cfg, extra, tmp_path / "b").model))
