"""A slice cache folder on disk (see :mod:`medgen.data.slices`, which builds it): its files,
opening it with the checks that catch a damaged one, and replacing a bad one.

A complete folder holds ``items.bin`` (the ``float16`` items: slices ``[N, C, S, S]``, or the whole
volumes ``[N, C, X, Y, Z]`` of a volume cache), ``index.npz`` (patient, axial position and lesion
pixels of each item; 0 and lesion voxels for a volume) and ``meta.json`` (written last, with the
checksum of the rest: :func:`cache_checksum`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import functools
import os
import shutil
from pathlib import Path

import numpy as np

from medgen.core.constants import MASK_KEY
from medgen.core.fs import temporary_path
from medgen.data.lesions import feret_diameters
from medgen.data.masks import is_lesion
from medgen.data.nifti_dataset import DataError

log = logging.getLogger("medgen.data")

CACHE_DTYPE = np.float16
DATA_FILE = "items.bin"
META_FILE = "meta.json"
INDEX_FILE = "index.npz"
#: how :func:`cache_checksum` is computed, recorded with the checksum and hashed into it (a cache
#: checked another way does not match)
CHECKSUM_SCHEME = "sha256/index+meta+slices-64x64KiB-v1"
_SAMPLE_BLOCKS = 64  # evenly spaced, first and last block included
_SAMPLE_BLOCK_BYTES = 64 * 1024


class CacheCorrupt(DataError):
    """A slice cache folder that cannot be used; the message names the folder and the reason."""

    def __init__(self, directory: Path, reason: str):
        super().__init__(f"slice cache {directory} cannot be used: {reason}")
        self.directory, self.reason = Path(directory), reason

    def __reduce__(self):
        return type(self), (self.directory, self.reason)


class ItemCache:
    """A built slice cache: ``data`` ``[N, C, S, S]`` float16 memmap plus per-slice index arrays
    (a volume cache: ``[N, C, X, Y, Z]``, one item per patient).

    Opening checks the folder: readable metadata and index that agree, a slices file of the
    expected size, and the checksum recorded when the cache was completed.

    Raises:
        CacheCorrupt: any of these fails (the message names the folder and the reason).
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        meta = self._read_meta()
        self.meta = meta
        try:
            self.keys: tuple[str, ...] = tuple(str(k) for k in meta["keys"])
            self.shape: tuple[int, ...] = tuple(int(n) for n in meta["shape"])
            self.patient_ids: list[str] = [str(p) for p in meta["patient_ids"]]
            #: median voxel size (mm) of a model slice, (x, y, z); None for a cache of no items
            self.spacing: list[float] | None = meta["spacing"]
            #: meta.json is written last, with the checksum of the rest: a cache without one is incomplete
            self._checksum: str = meta["checksum"]["sha256"]
            shape_ok = len(self.shape) in (4, 5) and min(self.shape) >= 0 and self.shape[1] == len(self.keys)
            if not shape_ok or meta["dtype"] != np.dtype(CACHE_DTYPE).name or not isinstance(self._checksum, str):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise CacheCorrupt(self.directory, f"{META_FILE} does not describe a slice cache") from None
        try:
            with np.load(self.directory / INDEX_FILE) as index:
                self.patient_index: np.ndarray = index["patient"]  # [N] index into patient_ids
                self.slice_index: np.ndarray = index["z"]  # [N] axial position in the source volume
                self.lesion_pixels: np.ndarray = index["lesion_pixels"]  # [N] (0 without a mask channel)
        except FileNotFoundError:
            raise CacheCorrupt(self.directory, f"{INDEX_FILE} is missing") from None
        except Exception as exc:  # a truncated or overwritten zip fails in many ways: all mean unusable
            raise CacheCorrupt(self.directory, f"{INDEX_FILE} is unreadable ({type(exc).__name__}: {exc})") from None
        n = self.shape[0]
        arrays = (self.patient_index, self.slice_index, self.lesion_pixels)
        if any(a.shape != (n,) or a.dtype.kind not in "iu" for a in arrays) or (
                n and not 0 <= self.patient_index.min() <= self.patient_index.max() < len(self.patient_ids)):
            raise CacheCorrupt(self.directory, f"{INDEX_FILE} does not match {META_FILE}")
        expected = int(np.prod(self.shape)) * np.dtype(CACHE_DTYPE).itemsize
        try:
            size = (self.directory / DATA_FILE).stat().st_size
        except FileNotFoundError:
            raise CacheCorrupt(self.directory, f"{DATA_FILE} is missing") from None
        except OSError as exc:
            raise CacheCorrupt(self.directory, f"{DATA_FILE} is unreadable ({exc.strerror})") from None
        if size != expected:
            raise CacheCorrupt(self.directory, f"{DATA_FILE} has {size} bytes, {expected} expected (truncated?)")
        try:
            actual = cache_checksum(self.directory, meta)
        except OSError as exc:
            raise CacheCorrupt(self.directory, f"cannot read it to check it ({exc.strerror})") from None
        if actual != self._checksum:
            raise CacheCorrupt(self.directory, "its contents do not match the checksum recorded when it was built")
        self._data: np.memmap | None = None

    def _read_meta(self) -> dict:
        try:
            meta = json.loads((self.directory / META_FILE).read_text())
        except FileNotFoundError:
            raise CacheCorrupt(self.directory, f"{META_FILE} is missing") from None
        except OSError as exc:
            raise CacheCorrupt(self.directory, f"{META_FILE} is unreadable ({exc.strerror})") from None
        except ValueError:  # not JSON, not UTF-8
            raise CacheCorrupt(self.directory, f"{META_FILE} is not valid JSON") from None
        if not isinstance(meta, dict):
            raise CacheCorrupt(self.directory, f"{META_FILE} does not describe a slice cache")
        return meta

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def data(self) -> np.ndarray:
        """The slices, opened lazily (so a pickled cache re-opens in each loader worker)."""
        if self._data is None:
            if self.shape[0] == 0:
                self._data = np.zeros(self.shape, dtype=CACHE_DTYPE)  # type: ignore[assignment]
            else:
                self._data = np.memmap(self.directory / DATA_FILE, dtype=CACHE_DTYPE, mode="r", shape=self.shape)
        return self._data

    @property
    def largest_mm(self) -> np.ndarray:
        """``[N]`` float64: the Feret diameter (mm, at the cache's pixel size) of each slice's largest
        lesion, 0 without lesion or mask channel (measured on first use: a pass over the lesion slices)."""
        return self._lesion_measures[0]

    @property
    def lesion_count(self) -> np.ndarray:
        """``[N]`` int64: the lesions (connected components, as the generation gate counts them) of
        each slice, 0 without lesion or mask channel (measured with :attr:`largest_mm`)."""
        return self._lesion_measures[1]

    @functools.cached_property
    def _lesion_measures(self) -> tuple[np.ndarray, np.ndarray]:
        largest, count = np.zeros(len(self), dtype=np.float64), np.zeros(len(self), dtype=np.int64)
        if MASK_KEY not in self.keys:
            return largest, count
        spacing = (self.spacing or (1.0, 1.0, 1.0))[:len(self.shape) - 2]  # a slice's 2 axes, a volume's 3
        channel = self.keys.index(MASK_KEY)
        for i in np.flatnonzero(self.lesion_pixels > 0):
            diameters = feret_diameters(is_lesion(self.data[i, channel]), spacing)
            largest[i], count[i] = max(diameters, default=0.0), len(diameters)
        return largest, count

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_data"] = None
        return state

    @staticmethod
    def is_complete(directory: Path) -> bool:
        """Every file of a cache is there (meta.json, written last, holds the checksum); whether
        their contents are intact is what opening checks."""
        return all((Path(directory) / f).is_file() for f in (DATA_FILE, INDEX_FILE, META_FILE))


def _sample_offsets(size: int) -> list[int]:
    """Offsets of the blocks of a slices file of ``size`` bytes that :func:`cache_checksum` reads:
    every block of a small file, else evenly spaced ones from the first to the last."""
    if size <= _SAMPLE_BLOCKS * _SAMPLE_BLOCK_BYTES:
        return list(range(0, size, _SAMPLE_BLOCK_BYTES))
    last = size - _SAMPLE_BLOCK_BYTES
    return [last * i // (_SAMPLE_BLOCKS - 1) for i in range(_SAMPLE_BLOCKS)]


def cache_checksum(directory: Path, meta: dict) -> str:
    """sha256 of a cache folder's contents: all of index.npz, the metadata (canonical JSON without
    the checksum), the size of items.bin and :data:`_SAMPLE_BLOCKS` blocks of it (the whole file
    when it is small). A warm start reads a few MB whatever the size of the cache; a file
    overwritten, truncated or swapped is caught, a change confined to unsampled bytes is not."""
    directory = Path(directory)
    h = hashlib.sha256(f"{CHECKSUM_SCHEME}\n".encode())
    h.update(hashlib.sha256((directory / INDEX_FILE).read_bytes()).digest())
    fields = {k: v for k, v in meta.items() if k != "checksum"}
    h.update(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode() + b"\n")
    fd = os.open(directory / DATA_FILE, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        h.update(f"{size}\n".encode())
        for offset in _sample_offsets(size):
            h.update(os.pread(fd, _SAMPLE_BLOCK_BYTES, offset))
    finally:
        os.close(fd)
    return h.hexdigest()


def open_checked(directory: Path) -> ItemCache | None:
    """The cache in ``directory`` if it passes its check; None when there is none, or when it
    failed (then, with a warning naming the folder and the reason, it is moved aside and deleted)."""
    try:
        seen = directory.lstat()
    except FileNotFoundError:
        return None
    try:
        return ItemCache(directory)
    except CacheCorrupt as exc:
        log.warning("%s; rebuilding it", exc)
        _discard(directory, seen)
        return None


def _discard(directory: Path, seen: os.stat_result) -> None:
    """Move the bad cache ``directory`` (as it was when ``seen``) out of the way, then delete it.
    Renaming first keeps the final name free for the rebuild at once, and a run killed while
    deleting leaves a temporary that the next run removes. If another process replaced the folder
    between the check and the rename, that new folder is put back rather than deleted."""
    aside = temporary_path(directory)
    try:
        os.rename(directory, aside)
    except FileNotFoundError:
        return  # another process moved it first
    except OSError as exc:
        raise CacheCorrupt(directory, f"it failed its check and cannot be moved aside ({exc.strerror})") from None
    st = aside.lstat()
    if (st.st_dev, st.st_ino) != (seen.st_dev, seen.st_ino) and _rename_back(aside, directory):
        return
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)


def _rename_back(aside: Path, directory: Path) -> bool:
    """Put a folder moved aside by mistake back in place; False if yet another one is there now
    (then the one aside is surplus)."""
    try:
        os.rename(aside, directory)
    except OSError:
        return False
    return True


def move_into_place(tmp: Path, directory: Path) -> None:
    """Rename the built ``tmp`` to ``directory`` (atomic). When another process finished the same
    cache first, keep that one if it passes its check, else replace it."""
    for attempt in range(3):
        try:
            os.replace(tmp, directory)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR) or attempt == 2:
                raise
        if open_checked(directory) is not None:  # else it failed its check and is gone now
            return
