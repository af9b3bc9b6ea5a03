"""Run by nnU-Net v2's own interpreter, never imported by medgen: plan, preprocess, train and predict
one downstream arm and seed (:mod:`medgen.evaluation.nnunet` starts it).

``python nnunet_driver.py job.json``, the job naming the dataset (``dataset_id``, already in the
raw folder of ``nnUNet_raw``), the ``configuration`` (``2d`` or ``3d_fullres``), the budget
(``epochs`` of ``iterations`` training batches, a fifth as many validation batches), the
``seed``, the ``device`` and the folders of the test images and of the predictions. The dataset
is fingerprinted, planned and preprocessed once (the first seed); the network trains on every case
(fold ``all``) and segments the test images with nnU-Net's own predictor, in this process, so
no trainer file is installed into nnU-Net's package. Only the standard library and nnU-Net's
environment are imported here.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path


def _seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _prepare(job: dict, preprocessed: Path, processes: int) -> None:
    """Fingerprint, plan and preprocess the dataset unless an earlier seed did."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess

    if (preprocessed / ".medgen-prepared").is_file():
        return
    ids = [int(job["dataset_id"])]
    workers = os.environ.get("nnUNet_n_proc_DA")
    if workers == "0":  # no augmentation workers (training): the planner would ask torch for 0 threads
        os.environ["nnUNet_n_proc_DA"] = "1"
    extract_fingerprints(ids, num_processes=processes, check_dataset_integrity=True, clean=True, verbose=False,
                         show_progress_bar=False)
    plan_experiments(ids)
    preprocess(ids, configurations=[job["configuration"]], num_processes=[processes], show_progress_bar=False)
    if workers == "0":
        os.environ["nnUNet_n_proc_DA"] = workers
    (preprocessed / ".medgen-prepared").write_text("done\n")


def _trainer_class(epochs: int, iterations: int):
    """nnU-Net's default trainer with medgen's epoch budget (its name says so in the results folder)."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class nnUNetTrainer_medgen(nnUNetTrainer):
        def __init__(self, plans: dict, configuration: str, fold, dataset_json: dict,
                     device: torch.device = torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = epochs
            self.num_iterations_per_epoch = iterations
            self.num_val_iterations_per_epoch = max(1, iterations // 5)

    return nnUNetTrainer_medgen


def _predict(trainer, job: dict, device) -> None:
    """Segment every case of ``job["test_images"]`` into ``job["predictions"]`` with the trained network."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    trainer.set_deep_supervision_enabled(False)
    network = getattr(trainer.network, "_orig_mod", trainer.network)  # the module itself, compiled or not
    network.eval()
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(network, trainer.plans_manager, trainer.configuration_manager,
                                    [network.state_dict()],
                                    trainer.dataset_json, trainer.__class__.__name__,
                                    trainer.inference_allowed_mirroring_axes)
    Path(job["predictions"]).mkdir(parents=True, exist_ok=True)
    predictor.predict_from_files_sequential(job["test_images"], job["predictions"], save_probabilities=False,
                                            overwrite=True)


def main(job_file: str) -> None:
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    job = json.loads(Path(job_file).read_text())
    name = maybe_convert_to_dataset_name(int(job["dataset_id"]))
    preprocessed = Path(os.environ["nnUNet_preprocessed"]) / name
    _seed(int(job["seed"]))
    _prepare(job, preprocessed, max(1, min(8, os.cpu_count() or 1)))
    device = torch.device(job["device"])
    trainer_class = _trainer_class(int(job["epochs"]), int(job["iterations"]))
    plans = load_json(str(preprocessed / "nnUNetPlans.json"))
    plans["continue_training"] = False  # what nnU-Net's own run_training hands its trainer (a fresh run)
    trainer = trainer_class(plans, job["configuration"], "all", load_json(str(preprocessed / "dataset.json")),
                            device=device)
    _seed(int(job["seed"]))
    trainer.run_training()
    _predict(trainer, job, device)
    print("medgen: nnU-Net done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
