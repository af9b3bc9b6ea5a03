"""``medgen-train``: train a diffusion model (any strategy x mode) from the Hydra config.

    medgen-train mode=bravo strategy=rflow training=cpu paths.data_dir=./data/phantoms
    medgen-train --cfg job                     # print the resolved config, do not run
    torchrun --nproc_per_node 4 -m medgen.scripts.train training.use_multi_gpu=true
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from medgen.core.signals import STOPPED_EXIT
from medgen.scripts._cli import CONFIG_DIR, exit_on_user_error, given_keys, warn_unused

log = logging.getLogger("medgen.train")


def run(cfg: DictConfig, explicit_dir: Path | None = None) -> str:
    """Validate, set up (distributed) training, choose the run folder, resume if asked, train.
    ``explicit_dir``: the run folder named on the command line (``hydra.run.dir=...``), if any.
    Returns the final status: ``"done"``, ``"max_steps"`` or ``"stopped"`` (by a signal: the
    command exits with :data:`~medgen.core.signals.STOPPED_EXIT`)."""
    from medgen.core.signals import ignore_late_warning, stop_signals

    # SIGTERM/SIGUSR1 (SLURM's warning, scancel --signal) count from the start: one that comes while
    # the cache is built or the model set up stops the run after its first step, with latest.pt saved
    with stop_signals() as stop:
        status = _run(cfg, explicit_dir, stop)
    # the work is done and saved: a time-limit warning (SLURM's USR1) that comes while the process exits
    # has nothing left to stop, and by default it would kill the finished job (marked FAILED, not requeued)
    ignore_late_warning()
    return status


def _run(cfg: DictConfig, explicit_dir: Path | None, stop) -> str:
    from medgen.core.distributed import barrier, cleanup, env_world, setup_distributed
    from medgen.core.precision import configure_backends
    from medgen.diffusion.config import unused_keys, validate_config
    from medgen.diffusion.run.folder import remove_if_unused
    from medgen.diffusion.trainer import DiffusionTrainer

    _, _, world = env_world()
    cfg = validate_config(cfg, world_size=world)
    configure_backends()
    dist = setup_distributed(cfg.training.use_multi_gpu)
    if dist.is_main:
        warn_unused("medgen-train", unused_keys(cfg, given_keys()))
    plan, lock = None, None
    try:
        plan, lock = _agree_on_run_folder(cfg, explicit_dir, dist)
        trainer = DiffusionTrainer(cfg, plan.run_dir, dist)
        if plan.checkpoint is not None:
            trainer.resume_from(plan.checkpoint)
        if dist.is_main:
            (plan.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
            (plan.run_dir / "overrides.yaml").write_text(OmegaConf.to_yaml(_overrides()))
        status = trainer.train(stop)
        barrier(dist)  # every rank leaves together: none exits while rank 0 still saves latest.pt
        if dist.is_main:
            msg = {"done": "finished", "max_steps": f"stopped at training.max_steps={cfg.training.max_steps}",
                   "stopped": "stopped on request"}[status]
            hint = f"; continue with training.resume={plan.run_dir}" if status == "stopped" else ""
            log.info("%s in epoch %s, step %d; checkpoints in %s%s", msg, trainer.epoch_label(), trainer.step,
                     plan.run_dir / "checkpoints", hint)
        return status
    finally:
        if plan is not None and dist.is_main:
            remove_if_unused(plan)
        if lock is not None:
            lock.release()
        cleanup()


def _agree_on_run_folder(cfg: DictConfig, explicit_dir: Path | None, dist):
    """The main rank plans the run folder (:func:`~medgen.diffusion.run.folder.plan_run`), locks it
    and tells the other ranks, so that all of them use one folder; an error reaches every rank."""
    from medgen.core.distributed import broadcast_object
    from medgen.diffusion.run.folder import RunFolderError, lock_run_folder, plan_run, remove_if_unused, start_branch

    plan, lock = None, None
    if dist.is_main:
        try:
            plan = plan_run(cfg, explicit_dir)
            lock = lock_run_folder(plan.run_dir)
            start_branch(plan)
        except BaseException as exc:
            broadcast_object({"error": f"{exc}"}, dist)
            if lock is not None:
                lock.release()
            if plan is not None:
                remove_if_unused(plan)
            raise
    answer = broadcast_object({"plan": plan}, dist)
    if "error" in answer:
        raise RunFolderError(f"rank 0 could not set up the run folder: {answer['error']}")
    return answer["plan"], lock


def _overrides() -> list[str]:
    """The command-line overrides of this run (recorded next to the resolved config)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    # medgen names the run folder itself (unique per run); hydra.run.dir=... on the command line names it instead
    explicit = Path(hydra_cfg.runtime.output_dir) if str(hydra_cfg.run.dir) != "." else None
    status = None
    try:
        with exit_on_user_error("medgen-train"):
            status = run(cfg, explicit)
    finally:
        if explicit is not None and explicit.is_dir() and not any(explicit.iterdir()):
            explicit.rmdir()  # Hydra created it for a run that wrote nothing (or continued elsewhere)
    if status == "stopped":  # saved, but not done: `medgen-train ... && next` does not go on
        sys.exit(STOPPED_EXIT)


def main() -> None:
    _main()


if __name__ == "__main__":
    sys.exit(main())
