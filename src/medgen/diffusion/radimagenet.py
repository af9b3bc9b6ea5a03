"""The RadImageNet ResNet50 and its published weights, found and loaded offline.

One network serves two users: the optional perceptual loss of the image modes
(:mod:`medgen.diffusion.perceptual`) and the ``radimagenet`` feature network of FID/KID
(:mod:`medgen.evaluation.features`).

Where the weights come from, in this order
------------------------------------------
1. A configured file (``training.perceptual_weights_path``, ``features.weights_path``): a
   state-dict file of the RadImageNet ResNet50 as published by the torch-hub repos
   ``Warvito/radimagenet-models`` and ``Project-MONAI/perceptual-models`` (same network code,
   same keys, file ``RadImageNet-ResNet50_notop.pth``). A configured path is authoritative: if
   it does not exist that is reported, never a silent fall-back to other weights.
2. The torch hub cache (:func:`torch.hub.get_dir`), at the places the hub entry points
   store the checkpoint: ``<hub>/RadImageNet-ResNet50_notop.pth`` (Project-MONAI repo,
   which MONAI 1.6 loads), ``<hub>/models--MONAI--checkpoints/snapshots/*/`` (its Hugging
   Face download), ``<hub>/monai_checkpoints/`` (its older download) and
   ``<hub>/checkpoints/`` (Warvito repo, MONAI <= 1.5).

Downloading (only the perceptual loss offers it) is MONAI's business, not this module's.

Why the ResNet50 is defined here instead of loading the cached hub repo
-----------------------------------------------------------------------
``torch.hub.load(..., source="github")`` is not offline-safe: without a ``:ref`` it asks
GitHub for the default branch, and without a cached repo folder it validates the ref
against the GitHub API and downloads a zip. Loading the cached folder with
``source="local"`` would avoid that, but it executes the repo's ``hubconf.py``, whose
entry point downloads the checkpoint itself when the file is not exactly where that
version of the repo expects it (the location changed between versions), and whose
current version imports ``huggingface_hub`` at import time. Torchvision, which would give
the plain architecture, is not a dependency. So :class:`RadImageNetResNet50` rebuilds
the published network in plain torch with the same module names (Keras-style ResNet50:
biased convolutions, stride on the first 1x1 convolution, BatchNorm eps 1.001e-5) and the
state dict is loaded into it with every key checked. Nothing here reaches ``torch.hub.load``
or any other network call; a missing file costs only a few ``stat`` calls.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

WEIGHTS_FILENAME = "RadImageNet-ResNet50_notop.pth"
HUB_REPO = "Project-MONAI/perceptual-models:main"
HUB_ENTRYPOINT = "radimagenet_resnet50"
WEIGHTS_URL = "https://huggingface.co/MONAI/checkpoints/resolve/main/RadImageNet-ResNet50_notop.pth"
#: the RadImageNet channel means (B, G, R) that are subtracted from a BGR input in [0, 1]
BGR_MEANS = (0.406, 0.456, 0.485)

# Hugging Face cache layout written by the hub entry point's ``hf_hub_download(cache_dir=<hub>)``.
_HF_SNAPSHOT_PATTERN = f"models--MONAI--checkpoints/snapshots/*/{WEIGHTS_FILENAME}"
_BN_EPS = 1.001e-5  # Keras BatchNormalization default, kept by the converted weights.
_MAX_KEYS_LISTED = 12


class RadImageNetWeightsError(RuntimeError):
    """A RadImageNet ResNet50 weights file is missing or unusable; the message says why."""


# --------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution with bias, as in the Keras ResNet50 the weights were converted from."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=True)


class _Bottleneck(nn.Module):
    """Keras-style bottleneck block: the stride sits on the first 1x1 convolution."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = _conv1x1(in_channels, width, stride=stride)
        self.bn1 = nn.BatchNorm2d(width, eps=_BN_EPS)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(width, eps=_BN_EPS)
        self.conv3 = _conv1x1(width, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels, eps=_BN_EPS)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                _conv1x1(in_channels, out_channels, stride=stride),
                nn.BatchNorm2d(out_channels, eps=_BN_EPS),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual bottleneck: 1x1 -> 3x3 -> 1x1, plus the (projected) identity."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class RadImageNetResNet50(nn.Module):
    """The RadImageNet ResNet50 feature extractor ("notop": no pooling, no classifier).

    Module names match the state dict published by ``Warvito/radimagenet-models`` and
    ``Project-MONAI/perceptual-models`` (``conv1``, ``bn1``, ``layer1``..``layer4`` with
    ``conv1/bn1/conv2/bn2/conv3/bn3`` and ``downsample.0/1`` per block). ``forward`` returns
    the ``layer4`` feature map ``[B, 2048, H/32, W/32]``; the input is a BGR image in [0, 1]
    with :data:`BGR_MEANS` subtracted (for the perceptual loss, MONAI's similarity module
    prepares it).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=True)
        self.bn1 = nn.BatchNorm2d(64, eps=_BN_EPS)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = 64
        stages = []
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            layer = [_Bottleneck(in_channels, width, stride)]
            in_channels = width * _Bottleneck.expansion
            layer.extend(_Bottleneck(in_channels, width) for _ in range(blocks - 1))
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the ``layer4`` feature map."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


# --------------------------------------------------------------------------------------
# Finding and loading the weights
# --------------------------------------------------------------------------------------


def hub_cache_weight_paths() -> list[Path]:
    """The fixed places in the torch hub cache where the hub entry points keep the file.

    The first entry, ``<torch.hub.get_dir()>/RadImageNet-ResNet50_notop.pth``, is the one to
    use when copying the file by hand. Hugging Face snapshot folders
    (``<hub>/models--MONAI--checkpoints/snapshots/<revision>/``) are searched as well.
    """
    hub_dir = Path(torch.hub.get_dir())
    return [
        hub_dir / WEIGHTS_FILENAME,
        hub_dir / "monai_checkpoints" / WEIGHTS_FILENAME,
        hub_dir / "checkpoints" / WEIGHTS_FILENAME,
    ]


def hub_cache_search_list() -> list[str]:
    """Human-readable list of every hub-cache location searched, for error messages."""
    paths = [str(p) for p in hub_cache_weight_paths()]
    paths.insert(1, str(Path(torch.hub.get_dir()) / _HF_SNAPSHOT_PATTERN))
    return paths


def find_radimagenet_weights(weights_path: str | os.PathLike[str] | None) -> Path | None:
    """Return the weights file to use, or ``None`` when there is none on this machine.

    A configured ``weights_path`` is authoritative: it is returned if it is a file and
    ``None`` otherwise (the torch hub cache is then not consulted, so a typo in the config
    never silently swaps in other weights). Without it, the torch hub cache locations from
    :func:`hub_cache_weight_paths` and the Hugging Face snapshot folders are searched.
    Never touches the network.
    """
    if weights_path is not None and str(weights_path) != "":
        path = Path(weights_path).expanduser()
        return path if path.is_file() else None

    fixed = hub_cache_weight_paths()
    if fixed[0].is_file():
        return fixed[0]
    snapshots = [p for p in Path(torch.hub.get_dir()).glob(_HF_SNAPSHOT_PATTERN) if p.is_file()]
    if snapshots:
        return max(snapshots, key=lambda p: p.stat().st_mtime)
    for path in fixed[1:]:
        if path.is_file():
            return path
    return None


def _format_keys(keys: list[str]) -> str:
    """Comma-separated key list, shortened after ``_MAX_KEYS_LISTED`` entries."""
    shown = ", ".join(keys[:_MAX_KEYS_LISTED])
    if len(keys) > _MAX_KEYS_LISTED:
        shown += f", ... ({len(keys) - _MAX_KEYS_LISTED} more)"
    return shown


def load_radimagenet_resnet50(path: str | os.PathLike[str]) -> RadImageNetResNet50:
    """Build :class:`RadImageNetResNet50` and load the state dict at ``path`` into it.

    Every key is checked: missing keys (other than BatchNorm's ``num_batches_tracked``
    counters, which are unused in eval mode), unexpected keys and shape mismatches raise
    :class:`RadImageNetWeightsError` naming them. The file is read with
    ``weights_only=True``, so it must be a plain state dict, not a pickled module.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for corrupt or non-tensor files
        raise RadImageNetWeightsError(
            f"Could not read {path} as a PyTorch state dict ({type(exc).__name__}: {exc}). "
            f"Expected the file {WEIGHTS_FILENAME} of the RadImageNet ResNet50 "
            f"(torch hub repo {HUB_REPO}, or Warvito/radimagenet-models)."
        ) from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RadImageNetWeightsError(
            f"{path} does not hold a state dict (a mapping of parameter names to tensors) but "
            f"{type(state).__name__}. Save it with torch.save(model.state_dict(), path)."
        )

    network = RadImageNetResNet50()
    expected = network.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} (file {tuple(state[k].shape)}, network {tuple(expected[k].shape)})"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing keys ({len(missing)}): {_format_keys(missing)}")
        if unexpected:
            problems.append(f"unexpected keys ({len(unexpected)}): {_format_keys(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatches ({len(mismatched)}): {_format_keys(mismatched)}")
        raise RadImageNetWeightsError(
            f"{path} is not a RadImageNet ResNet50 state dict: " + "; ".join(problems) + ". "
            f"Expected the file {WEIGHTS_FILENAME} from torch hub repo {HUB_REPO} "
            f"(or Warvito/radimagenet-models), keys like 'conv1.weight', 'layer1.0.conv1.bias', "
            f"'layer4.2.bn3.running_var'."
        )
    network.load_state_dict(state, strict=False)  # only num_batches_tracked may be absent
    return network
