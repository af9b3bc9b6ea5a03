"""The records a generation run passes between its stages and writes to ``manifest.csv``.

A mask comes from a stage-1 candidate (:class:`CandidateSource`, ``"candidate 7"`` in the
manifest's ``mask_source``) or from an item of a real dataset (:class:`ItemSource`: a slice,
``"test/patient_003/z41"``, or a volume, ``"test/patient_003"``); :func:`parse_mask_source` reads
the column back. A
:class:`Candidate` is one evaluated stage-1 mask with its gate measurements, a
:class:`MaskRecord` what the manifest says about a mask, and :class:`Masks` everything stage 2
paints from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from medgen.core.constants import BRAIN_KEY, MASK_KEY
from medgen.generation.gate import MaskStats

_CANDIDATE = re.compile(r"candidate (\d+)")


@dataclass(frozen=True)
class CandidateSource:
    """Stage-1 candidate ``index`` (its noise: ``sample_seed(seed, index, MASK_STREAM)``)."""

    index: int

    def format(self) -> str:
        return f"candidate {self.index}"


@dataclass(frozen=True)
class ItemSource:
    """An item of ``patient`` in ``split`` of a real dataset (``masks_from``): its axial slice ``z``,
    or its whole volume (``z`` None, for a volume model)."""

    split: str
    patient: str
    z: int | None = None

    def format(self) -> str:
        return f"{self.split}/{self.patient}" + ("" if self.z is None else f"/z{self.z}")

    @property
    def sample_name(self) -> str:
        """The name of the samples painted on this mask: ``<patient>_z<zzz>``, or the patient's."""
        return self.patient if self.z is None else f"{self.patient}_z{self.z:03d}"


MaskSource = Union[CandidateSource, ItemSource]


def parse_mask_source(text: str) -> MaskSource | None:
    """The source a manifest's ``mask_source`` names (None for a text no medgen writes)."""
    m = _CANDIDATE.fullmatch(text)
    if m:
        return CandidateSource(int(m[1]))
    parts = text.split("/")
    if len(parts) == 3 and parts[2].startswith("z") and parts[2][1:].isdigit():
        return ItemSource(parts[0], parts[1], int(parts[2][1:]))
    if len(parts) == 2 and all(parts):
        return ItemSource(parts[0], parts[1])
    return None


@dataclass(frozen=True)
class Candidate:
    """One evaluated stage-1 mask: its gate measurements (one mask's :class:`MaskStats`), the
    verdict, and the mask ``[S, S]`` uint8 and the brain drawn with it where they were read (None
    otherwise, and the brain None for a mask model that does not draw it)."""

    index: int
    stats: MaskStats
    accepted: bool
    mask: np.ndarray | None = None
    brain: np.ndarray | None = None
    #: Feret diameter (mm) of its largest lesion, 0 without lesion
    largest_mm: float = 0.0


@dataclass(frozen=True)
class MaskRecord:
    """What the manifest says about one mask: where it came from, the seed of its noise (stage-1
    candidates only), its lesion area and count, and whether the gate accepted it."""

    source: MaskSource
    area: float
    components: int
    accepted: bool
    seed: int | None = None

    def sample_name(self, i: int) -> str:
        """The name of the samples painted on this mask, mask ``i`` of the run."""
        return f"syn_{i:06d}" if isinstance(self.source, CandidateSource) else self.source.sample_name

    def manifest_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"mask_source": self.source.format()}
        if self.seed is not None:
            fields["mask_seed"] = self.seed
        return {**fields, "mask_area": f"{self.area:.6f}", "components": int(self.components),
                "accepted": bool(self.accepted)}


@dataclass
class Masks:
    """The masks stage 2 paints: ``masks [N, S, S]`` (volumes: ``[N, X, Y, Z]``) uint8 with a record each, the masks the gate
    rejected on the way (stage 1), the gate's acceptance rate (None for real masks), and the brain
    of each mask ``[N, S, S]`` uint8 (None when neither the mask model nor the real data gave one)."""

    masks: np.ndarray
    records: list[MaskRecord]
    rejected: list[MaskRecord]
    acceptance_rate: float | None
    brains: np.ndarray | None = None
    #: with a size target: the request, the classes before the size gate and after (``lesion_sizes.json``)
    size_report: dict[str, Any] | None = None

    def conditions(self, keys: tuple[str, ...], index: list[int]) -> np.ndarray:
        """The condition channels ``keys`` (``seg``, ``brain``) of masks ``index``: ``[B, len(keys), S, S]`` float32 {0, 1}."""
        planes = {MASK_KEY: self.masks, BRAIN_KEY: self.brains}
        missing = [k for k in keys if planes.get(k) is None]
        if missing:
            raise ValueError(f"the masks of this run have no {missing} to condition on")
        return np.stack([planes[k][index] for k in keys], axis=1).astype(np.float32)
