"""Shared fixtures: a tiny dataset and tiny configs that train in well under a second per step.

The device: the suite is written for the CPU (bit-exact comparisons with CPU runs, DDP tests that
start two ranks on one machine, which NCCL refuses on one GPU, ``compile=auto`` being eager). On a
machine with a GPU it runs on the CPU all the same: the GPU is hidden here, before torch first
looks for one, from this process and from every process a test starts (``CUDA_VISIBLE_DEVICES=``).
``MEDGEN_TEST_CUDA=1`` keeps the GPU and runs only the tests marked ``cuda`` (the rest are skipped);
without it those are skipped.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

CUDA_TESTS = os.environ.get("MEDGEN_TEST_CUDA") == "1"
if not CUDA_TESTS:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
#: ``make test`` runs the default tier in pytest-xdist workers, one per core: one intra-op thread each
#: (for them and the commands they start), so that the workers do not fight over the cores
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "unit"))  # `from datagen import ...` in every test module

from datagen import write_dataset  # noqa: E402

from medgen.diffusion.config import load_config  # noqa: E402

TINY_MODEL = ["model.image_size=16", "model.channels=[32,32]", "model.attention_levels=[false,true]",
              "model.num_head_channels=32"]


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "cuda: runs on a CUDA GPU (run with: MEDGEN_TEST_CUDA=1 pytest -m cuda tests/unit)")


#: the per-test limit of the slow and cluster tiers, for a test that does not set its own; the default
#: tier's limit (pyproject.toml) is short, so that a hang there shows in minutes
LONG_TIMEOUT = 900


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        long = any(item.get_closest_marker(m) for m in ("slow", "cluster", "demo"))
        if long and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(LONG_TIMEOUT))
        if "integration" in item.path.parts and not long:
            item.add_marker(pytest.mark.cli)
    if not CUDA_TESTS:
        skip = pytest.mark.skip(reason="needs a CUDA GPU and MEDGEN_TEST_CUDA=1 (the suite runs on the CPU)")
        wrong = [item for item in items if item.get_closest_marker("cuda")]
    elif not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="MEDGEN_TEST_CUDA=1 but PyTorch sees no CUDA GPU")
        wrong = items
    else:
        skip = pytest.mark.skip(reason="written for the CPU: runs without MEDGEN_TEST_CUDA=1")
        wrong = [item for item in items if not item.get_closest_marker("cuda")]
    for item in wrong:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny") / "data"
    write_dataset(root, n_patients=5, shape=(32, 32, 8), keys=("bravo", "t1_pre", "t1_gd", "seg"))
    return root


def tiny_overrides(tmp_path: Path, data: Path, *extra: str) -> list[str]:
    return [f"paths.data_dir={data}", f"paths.cache_dir={tmp_path / 'cache'}", f"paths.model_dir={tmp_path / 'runs'}",
            "training=fast_debug", "training.precision=fp32", "training.num_sample_steps=3", "data.num_workers=0",
            "training.batch_size=4", *TINY_MODEL, *extra]


@pytest.fixture
def tiny_cfg(tmp_path, tiny_data):
    def make(*extra: str):
        return load_config(tiny_overrides(tmp_path, tiny_data, *extra))

    return make


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is as fast and does not stall on a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, tiny_data) -> dict[str, Path]:
    """Checkpoints of a few training steps at 16 px: seg (DDPM), bravo (rectified flow, trained
    with condition dropout) and dual (DDPM); what generation tests sample from."""
    from medgen.core.distributed import DistInfo
    from medgen.diffusion.trainer import DiffusionTrainer

    tmp = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for mode, strategy, extra in (("seg", "ddpm", ()), ("bravo", "rflow", ("training.cond_dropout=0.2",)),
                                  ("dual", "ddpm", ())):
        cfg = load_config(tiny_overrides(tmp, tiny_data, f"mode={mode}", f"strategy={strategy}",
                                         "training.max_steps=6", *extra))
        DiffusionTrainer(cfg, tmp / mode, DistInfo(device=torch.device("cpu")), progress=False).train()
        out[mode] = tmp / mode / "checkpoints" / "latest.pt"
    return out


#: the overrides of the 3D models of the tests: volumes of 16 x 16 x 8 in batches of 2
VOLUMES = ("model.image_size=[16,16,8]", "training.batch_size=2")


@pytest.fixture(scope="session")
def volume_checkpoints(tmp_path_factory, tiny_data) -> dict[str, Path]:
    """A few training steps of a 3D seg model (rectified flow, seg + brain) and a 3D bravo model
    (DDPM) on volumes of 16 x 16 x 8: what the generation tests of volumes sample from."""
    from medgen.core.distributed import DistInfo
    from medgen.diffusion.trainer import DiffusionTrainer

    tmp = tmp_path_factory.mktemp("volume_checkpoints")
    out = {}
    for mode, strategy in (("seg", "rflow"), ("bravo", "ddpm")):
        cfg = load_config(tiny_overrides(tmp, tiny_data, f"mode={mode}", f"strategy={strategy}", *VOLUMES,
                                         "training.max_steps=3", "training.val_interval=100"))
        DiffusionTrainer(cfg, tmp / mode, DistInfo(device=torch.device("cpu")), progress=False).train()
        out[mode] = tmp / mode / "checkpoints" / "latest.pt"
    return out


@pytest.fixture(scope="session")
def feature_net(tmp_path_factory) -> Path:
    """A tiny TorchScript feature network (any TorchScript file is a valid features.network)."""
    torch.manual_seed(0)  # the same network in every test that compares FIDs
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten())
    path = tmp_path_factory.mktemp("net") / "features.pt"
    torch.jit.script(net).save(str(path))
    return path


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed cluster test (tests/cluster) also shows the end of SLURM's own logs."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed and "slurm" in getattr(item, "funcargs", {}):
        logs = Path(item.funcargs["slurm"]["MEDGEN_SLURM_DIR"]) / "log"
        for name in ("slurmctld.log", "slurmd.log"):
            if (logs / name).exists():
                tail = "\n".join((logs / name).read_text(errors="replace").splitlines()[-40:])
                report.sections.append((f"{name} (last 40 lines)", tail))


@pytest.fixture
def tf32_off():
    """TF32 off during the test, the flags restored after it."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def reference_state() -> dict[str, torch.Tensor]:
    """Random RadImageNet ResNet50 weights with non-trivial BatchNorm statistics."""
    from medgen.diffusion.radimagenet import RadImageNetResNet50

    torch.manual_seed(0)
    net = RadImageNetResNet50()
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return {k: v.clone() for k, v in net.state_dict().items()}


def square_seg_model(monkeypatch, sides) -> list[int]:
    """Generation with a stand-in seg model: candidate j draws one square lesion of ``sides[j %
    len(sides)]`` pixels (0: none) inside a brain that fills the slice but its border; the image
    model stays the real one. Returns the number of candidates drawn so far (a one-item list)."""
    from medgen.generation import Stage

    drawn, real_sample = [0], Stage.sample

    def sample(self, cond, generators, **kwargs):
        if not self.mode.generates_mask:
            return real_sample(self, cond, generators, **kwargs)
        n, size = len(generators), self.space.size
        x0 = -torch.ones(n, 2, size, size)
        x0[:, 1, 1:size - 1, 1:size - 1] = 1  # the brain
        for b in range(n):
            k = sides[(drawn[0] + b) % len(sides)]
            x0[b, 0, 2:2 + k, 2:2 + k] = 1
        drawn[0] += n
        return x0

    monkeypatch.setattr(Stage, "sample", sample)
    return drawn


def missing_test(node_id: str, root: Path = Path(__file__).resolve().parents[1]) -> str | None:
    """Why ``node_id`` (``tests/<file>::<test>[params]``) names no test of this repository, or None."""
    import re

    path, _, name = node_id.partition("::")
    if not name:
        return f"{node_id!r} is not a node id (path::test_name)"
    if not (root / path).is_file():
        return f"{path} does not exist"
    function = name.split("[")[0]
    if not re.search(rf"^\s*def {re.escape(function)}\(", (root / path).read_text(), re.MULTILINE):
        return f"{path} has no test {function}"
    return None
