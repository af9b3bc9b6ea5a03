"""Tests for the optional RadImageNet perceptual loss (medgen.diffusion.perceptual); the network's
own loading is tested in test_radimagenet.py.

No test touches the network: every test runs with socket connections and URL opening
replaced by a guard that records and refuses any attempt, and with the torch hub cache
pointed at an empty temporary folder.
"""

from __future__ import annotations

import socket
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from medgen.diffusion import perceptual
from medgen.diffusion.perceptual import PerceptualWeightsError, build_perceptual_loss
from medgen.diffusion.radimagenet import (
    WEIGHTS_FILENAME,
    RadImageNetResNet50,
    RadImageNetWeightsError,
    find_radimagenet_weights,
)


class NetworkAttempt(AssertionError):
    """Raised by the guard when code under test tries to reach the network."""


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Refuse (and record) every connection attempt made during a test."""
    attempts: list[str] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(repr(args[:2]))
        raise NetworkAttempt(f"network access attempted: {args[:2]!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "urlopen", refuse)  # torch.hub imported it by name
    yield attempts
    assert attempts == [], f"network was attempted: {attempts}"


@pytest.fixture(autouse=True)
def empty_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point torch.hub.get_dir() at an empty folder via TORCH_HOME."""
    torch_home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # undo any earlier torch.hub.set_dir
    hub = Path(torch.hub.get_dir())
    assert hub == torch_home / "hub"
    return hub


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory, reference_state: dict[str, torch.Tensor]) -> Path:
    """The random state dict saved the way the published file is (a plain state dict)."""
    path = tmp_path_factory.mktemp("weights") / WEIGHTS_FILENAME
    torch.save(reference_state, path)
    return path


def _images(seed: int, shape: tuple[int, ...] = (2, 1, 64, 64)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator)


# --------------------------------------------------------------------------------------
# Missing weights
# --------------------------------------------------------------------------------------


def test_missing_weights_raise_helpful_error_quickly(empty_hub: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(PerceptualWeightsError) as info:
        build_perceptual_loss(0.001)
    elapsed = time.perf_counter() - start

    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert "training.perceptual_weights_path=/path/to/file.pth" in message
    assert str(empty_hub / WEIGHTS_FILENAME) in message
    assert str(empty_hub / "checkpoints" / WEIGHTS_FILENAME) in message
    assert "training.perceptual_weight=0" in message
    assert "training.perceptual_allow_download=true" in message
    assert "torch.hub.load('Project-MONAI/perceptual-models:main', 'radimagenet_resnet50'" in message
    assert elapsed < 2.0


def test_missing_configured_file_is_an_error_even_with_a_hub_cache(
    empty_hub: Path, weights_file: Path, tmp_path: Path
) -> None:
    (empty_hub / WEIGHTS_FILENAME).parent.mkdir(parents=True, exist_ok=True)
    (empty_hub / WEIGHTS_FILENAME).write_bytes(weights_file.read_bytes())
    missing = tmp_path / "typo.pth"

    assert find_radimagenet_weights(missing) is None
    with pytest.raises(PerceptualWeightsError, match="does not exist") as info:
        build_perceptual_loss(0.5, weights_path=missing, allow_download=True)
    assert str(missing) in str(info.value)


def test_weight_zero_returns_none_without_looking_for_weights() -> None:
    assert build_perceptual_loss(0.0) is None
    assert build_perceptual_loss(0, weights_path="/does/not/exist.pth") is None


def test_negative_weight_is_rejected() -> None:
    with pytest.raises(ValueError, match="perceptual_weight"):
        build_perceptual_loss(-0.1)


# --------------------------------------------------------------------------------------
# Local weights file
# --------------------------------------------------------------------------------------


def test_local_weights_file_gives_a_working_frozen_loss(
    weights_file: Path, reference_state: dict[str, torch.Tensor]
) -> None:
    loss_fn = build_perceptual_loss(0.001, weights_path=str(weights_file), device="cpu")
    assert loss_fn is not None
    assert loss_fn.source == str(weights_file)

    params = list(loss_fn.parameters())
    assert params and not any(p.requires_grad for p in params)
    assert not any(m.training for m in loss_fn.modules())
    network = loss_fn.loss.perceptual_function.model
    assert isinstance(network, RadImageNetResNet50)
    torch.testing.assert_close(network.layer4[2].bn3.running_var, reference_state["layer4.2.bn3.running_var"])

    target = _images(1)
    assert loss_fn(target, target.clone()).item() == 0.0

    pred = _images(2).requires_grad_(True)
    value = loss_fn(pred, target)
    assert value.ndim == 0 and value.dtype == torch.float32
    assert value.item() > 0
    value.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_train_mode_keeps_network_in_eval(weights_file: Path) -> None:
    loss_fn = build_perceptual_loss(1.0, weights_path=weights_file)
    assert loss_fn is not None
    loss_fn.train()
    assert not any(m.training for m in loss_fn.loss.modules())
    target = _images(3)
    before = loss_fn.loss.perceptual_function.model.bn1.running_mean.clone()
    loss_fn(_images(4), target)
    torch.testing.assert_close(loss_fn.loss.perceptual_function.model.bn1.running_mean, before)


def test_multichannel_loss_is_mean_of_per_channel_losses(weights_file: Path) -> None:
    loss_fn = build_perceptual_loss(1.0, weights_path=weights_file)
    assert loss_fn is not None
    pred, target = _images(5, (2, 3, 64, 64)), _images(6, (2, 3, 64, 64))
    per_channel = [loss_fn(pred[:, c : c + 1], target[:, c : c + 1]) for c in range(3)]
    torch.testing.assert_close(loss_fn(pred, target), torch.stack(per_channel).mean())

    two = _images(7, (1, 2, 64, 64))
    assert loss_fn(two, two.clone()).item() == 0.0


def test_runs_under_bf16_autocast(weights_file: Path) -> None:
    loss_fn = build_perceptual_loss(1.0, weights_path=weights_file)
    assert loss_fn is not None
    pred = _images(8).requires_grad_(True)
    target = _images(9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss_fn(pred, target)
        same = loss_fn(target, target.clone())
    assert value.dtype == torch.float32 and torch.isfinite(value) and value.item() > 0
    assert same.item() == 0.0
    value.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()


def test_shape_mismatch_is_rejected(weights_file: Path) -> None:
    loss_fn = build_perceptual_loss(1.0, weights_path=weights_file)
    assert loss_fn is not None
    with pytest.raises(ValueError, match="shape"):
        loss_fn(_images(1, (1, 1, 64, 64)), _images(1, (1, 1, 32, 32)))


# --------------------------------------------------------------------------------------
# Bad weight files
# --------------------------------------------------------------------------------------


def test_an_unusable_weights_file_raises_the_loaders_error(reference_state: dict[str, torch.Tensor],
                                                           tmp_path: Path) -> None:
    path = tmp_path / "prefixed.pth"
    torch.save({f"module.{k}": v for k, v in reference_state.items()}, path)
    with pytest.raises(RadImageNetWeightsError, match=r"unexpected keys \(371\): module\.conv1\.weight") as info:
        build_perceptual_loss(1.0, weights_path=path)
    assert not isinstance(info.value, PerceptualWeightsError)  # the file is there, it is wrong


# --------------------------------------------------------------------------------------
# Torch hub cache
# --------------------------------------------------------------------------------------


def _lay_out_hub_repo(hub: Path, repo_folder: str) -> None:
    """What torch.hub leaves behind after loading a repo: its folder and the trusted list."""
    (hub / repo_folder).mkdir(parents=True)
    (hub / repo_folder / "hubconf.py").write_text('dependencies = ["torch"]\n')
    owner_name = repo_folder.rsplit("_", 1)[0]
    (hub / "trusted_list").write_text(owner_name + "\n")


@pytest.mark.parametrize(
    ("repo_folder", "relative"),
    [
        ("Project-MONAI_perceptual-models_main", WEIGHTS_FILENAME),
        ("Project-MONAI_perceptual-models_main", f"models--MONAI--checkpoints/snapshots/0123abcd/{WEIGHTS_FILENAME}"),
        ("Project-MONAI_perceptual-models_main", f"monai_checkpoints/{WEIGHTS_FILENAME}"),
        ("Warvito_radimagenet-models_main", f"checkpoints/{WEIGHTS_FILENAME}"),
    ],
)
def test_hub_cache_is_found_and_used(empty_hub: Path, weights_file: Path, repo_folder: str, relative: str) -> None:
    _lay_out_hub_repo(empty_hub, repo_folder)
    target = empty_hub / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(weights_file.read_bytes())

    assert find_radimagenet_weights(None) == target
    loss_fn = build_perceptual_loss(0.01)
    assert loss_fn is not None and loss_fn.source == str(target)
    image = _images(10)
    assert loss_fn(image, image.clone()).item() == 0.0


def test_configured_path_takes_precedence_over_hub_cache(empty_hub: Path, weights_file: Path) -> None:
    empty_hub.mkdir(parents=True, exist_ok=True)
    (empty_hub / WEIGHTS_FILENAME).write_bytes(b"corrupt cache entry")
    assert find_radimagenet_weights(weights_file) == weights_file
    loss_fn = build_perceptual_loss(1.0, weights_path=weights_file)
    assert loss_fn is not None and loss_fn.source == str(weights_file)


def test_repo_without_checkpoint_is_not_enough(empty_hub: Path) -> None:
    _lay_out_hub_repo(empty_hub, "Project-MONAI_perceptual-models_main")
    assert find_radimagenet_weights(None) is None
    with pytest.raises(PerceptualWeightsError):
        build_perceptual_loss(1.0)


# --------------------------------------------------------------------------------------
# Download through MONAI (torch.hub.load replaced, so still offline)
# --------------------------------------------------------------------------------------


def test_download_goes_through_monai_torch_hub(
    monkeypatch: pytest.MonkeyPatch, reference_state: dict[str, torch.Tensor]
) -> None:
    calls: list[tuple[tuple[object, ...], dict[str, object]]] = []

    def fake_hub_load(*args: object, **kwargs: object) -> torch.nn.Module:
        calls.append((args, kwargs))
        net = RadImageNetResNet50()
        net.load_state_dict(reference_state)
        return net

    monkeypatch.setattr(torch.hub, "load", fake_hub_load)
    with pytest.raises(PerceptualWeightsError):
        build_perceptual_loss(1.0, allow_download=False)
    assert calls == []

    loss_fn = build_perceptual_loss(1.0, allow_download=True)
    assert loss_fn is not None
    assert len(calls) == 1
    args, kwargs = calls[0]
    assert args[0] == "Project-MONAI/perceptual-models:main"
    assert kwargs.get("model", args[1] if len(args) > 1 else None) == "radimagenet_resnet50"
    image = _images(11)
    assert loss_fn(image, image.clone()).item() == 0.0
    assert loss_fn(_images(12), image).item() > 0


def test_failed_download_raises_weights_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline_hub_load(*args: object, **kwargs: object) -> torch.nn.Module:
        raise RuntimeError("It looks like there is no internet connection")

    monkeypatch.setattr(torch.hub, "load", offline_hub_load)
    with pytest.raises(PerceptualWeightsError, match="no internet connection") as info:
        build_perceptual_loss(1.0, allow_download=True)
    assert "training.perceptual_weight=0" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_monai_similarity_name_is_restored_after_build(weights_file: Path) -> None:
    original = perceptual.monai_perceptual.RadImageNetPerceptualSimilarity
    build_perceptual_loss(1.0, weights_path=weights_file)
    assert perceptual.monai_perceptual.RadImageNetPerceptualSimilarity is original


# --------------------------------------------------------------------------------------
# Volumes: the 2.5D loss
# --------------------------------------------------------------------------------------


def test_a_volume_is_scored_on_random_slices_of_its_three_planes(weights_file: Path) -> None:
    """PlanesPerceptualLoss == the mean over axial, coronal and sagittal of the slice loss on the
    slices a generator with the same seed draws (cut out by hand here), without touching torch's
    global RNG; an axis shorter than ``slices`` gives all its slices."""
    slice_loss = build_perceptual_loss(0.001, weights_path=str(weights_file), device="cpu")
    planes = perceptual.PlanesPerceptualLoss(slice_loss, slices=2)
    pred, target = _images(3, (2, 1, 8, 6, 4)).requires_grad_(True), _images(4, (2, 1, 8, 6, 4))

    state = torch.random.get_rng_state()
    value = planes(pred, target, torch.Generator().manual_seed(7))
    assert torch.equal(torch.random.get_rng_state(), state)

    g = torch.Generator().manual_seed(7)
    z, y, x = (torch.randperm(n, generator=g)[:2].tolist() for n in (4, 6, 8))
    expected = (slice_loss(torch.cat([pred[..., k] for k in z]), torch.cat([target[..., k] for k in z]))
                + slice_loss(torch.cat([pred[:, :, :, k] for k in y]), torch.cat([target[:, :, :, k] for k in y]))
                + slice_loss(torch.cat([pred[:, :, k] for k in x]), torch.cat([target[:, :, k] for k in x]))) / 3
    torch.testing.assert_close(value, expected)
    assert value.item() > 0 and planes(target, target.clone(), torch.Generator().manual_seed(7)).item() == 0.0
    value.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0

    other = planes(pred, target, torch.Generator().manual_seed(8))
    assert other.item() != pytest.approx(value.item(), rel=1e-6)  # other slices, another value
    every = perceptual.PlanesPerceptualLoss(slice_loss, slices=50)  # more than any axis holds: all of them
    whole = (slice_loss(pred.movedim(4, 1).reshape(-1, 1, 8, 6), target.movedim(4, 1).reshape(-1, 1, 8, 6))
             + slice_loss(pred.movedim(3, 1).reshape(-1, 1, 8, 4), target.movedim(3, 1).reshape(-1, 1, 8, 4))
             + slice_loss(pred.movedim(2, 1).reshape(-1, 1, 6, 4), target.movedim(2, 1).reshape(-1, 1, 6, 4))) / 3
    torch.testing.assert_close(every(pred, target, torch.Generator().manual_seed(0)), whole)

    with pytest.raises(ValueError, match="step's generator"):
        planes(pred, target)
    with pytest.raises(ValueError, match=r"\[B, C, X, Y, Z\]"):
        planes(pred[..., 0], target[..., 0], g)
