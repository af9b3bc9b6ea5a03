"""The RadImageNet ResNet50 and its weights file: what loading accepts and refuses, and that the
perceptual loss and the FID/KID features use the same network. Nothing touches the network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medgen.diffusion.perceptual import build_perceptual_loss
from medgen.diffusion.radimagenet import (
    BGR_MEANS,
    RadImageNetResNet50,
    RadImageNetWeightsError,
    find_radimagenet_weights,
    load_radimagenet_resnet50,
)
from medgen.evaluation.features import load_feature_network


def _saved(tmp_path: Path, state: object, name: str = "weights.pth") -> Path:
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_a_published_style_file_loads_every_tensor(reference_state, tmp_path: Path) -> None:
    net = load_radimagenet_resnet50(_saved(tmp_path, reference_state))
    assert all(torch.equal(v, reference_state[k]) for k, v in net.state_dict().items())
    assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 2048, 2, 2)  # layer4, H/32 x W/32


def test_missing_num_batches_tracked_is_tolerated(reference_state, tmp_path: Path) -> None:
    state = {k: v for k, v in reference_state.items() if not k.endswith("num_batches_tracked")}
    net = load_radimagenet_resnet50(_saved(tmp_path, state))
    assert torch.equal(net.layer4[2].bn3.running_var, reference_state["layer4.2.bn3.running_var"])


def test_wrong_keys_name_missing_and_unexpected(reference_state, tmp_path: Path) -> None:
    state = dict(reference_state)
    state.pop("layer4.2.conv3.weight")
    state.pop("bn1.running_mean")
    state["fc.weight"] = torch.zeros(10, 2048)
    with pytest.raises(RadImageNetWeightsError) as info:
        load_radimagenet_resnet50(_saved(tmp_path, state))
    message = str(info.value)
    assert "missing keys (2)" in message
    assert "layer4.2.conv3.weight" in message and "bn1.running_mean" in message
    assert "unexpected keys (1): fc.weight" in message


def test_torchvision_style_prefix_is_reported(reference_state, tmp_path: Path) -> None:
    path = _saved(tmp_path, {f"module.{k}": v for k, v in reference_state.items()})
    with pytest.raises(RadImageNetWeightsError, match=r"unexpected keys \(371\): module\.conv1\.weight, .* more\)"):
        load_radimagenet_resnet50(path)


def test_shape_mismatch_in_file_is_reported(reference_state, tmp_path: Path) -> None:
    state = dict(reference_state)
    state["conv1.weight"] = torch.zeros(64, 1, 7, 7)
    with pytest.raises(RadImageNetWeightsError, match=r"conv1\.weight \(file \(64, 1, 7, 7\), network \(64, 3, 7, 7\)\)"):
        load_radimagenet_resnet50(_saved(tmp_path, state))


def test_unreadable_file_and_pickled_module_are_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(RadImageNetWeightsError, match="Could not read"):
        load_radimagenet_resnet50(garbage)
    with pytest.raises(RadImageNetWeightsError):
        load_radimagenet_resnet50(_saved(tmp_path, torch.nn.Linear(2, 2), "module.pth"))


def test_a_configured_path_is_authoritative(tmp_path: Path) -> None:
    assert find_radimagenet_weights(tmp_path / "typo.pth") is None
    (tmp_path / "there.pth").write_bytes(b"x")
    assert find_radimagenet_weights(str(tmp_path / "there.pth")) == tmp_path / "there.pth"


def test_features_and_perceptual_loss_use_the_same_network(reference_state, tmp_path: Path) -> None:
    path = _saved(tmp_path, reference_state)
    features = load_feature_network("radimagenet", torch.device("cpu"), batch_size=2, weights_path=str(path))
    images = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    net = load_radimagenet_resnet50(path).eval()
    bgr = images.expand(-1, 3, -1, -1).flip(1) - torch.tensor(BGR_MEANS).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = net(bgr).mean(dim=(2, 3)).double().numpy()
    assert features.name == "radimagenet"
    np.testing.assert_allclose(features.extract(images), expected, rtol=1e-5, atol=1e-6)  # batches of 2 vs 3
    loss = build_perceptual_loss(1.0, weights_path=path)
    assert isinstance(loss.loss.perceptual_function.model, RadImageNetResNet50)
    assert torch.equal(loss.loss.perceptual_function.model.conv1.weight, net.conv1.weight)
