"""What a NIfTI-like file really is, and why it cannot be used (docs/data.md, Odd files).

:func:`medgen.data.nifti_dataset.load_volume` reads every volume medgen uses; this module gives it
the one-line reasons for refusing a file, each TRUE for that file rather than a guess:

- :func:`open_image`: the header (a gzipped single-file NIfTI-1/2 decompressed in one call);
- :func:`image_problem`: a file that parses but holds no volume for medgen: CIFTI-2
  (grayordinates, not voxels), the header of a ``.hdr``/``.img`` pair whose ``.img`` is missing,
  a pair header saved under a single-file name (magic ``ni1``/``ni2`` in a ``.nii``), complex or
  RGB voxels;
- :func:`read_failure`: an exception raised while reading, named by its cause (a file shorter than
  its header promises, a gzip stream that ends early or is corrupt, an empty file, an Analyze or
  pair header where a NIfTI file was expected, something that is not NIfTI at all);
- :func:`squeeze_trailing`: trailing singleton dimensions ``(x, y, z, 1[, 1 ...])`` dropped, with
  a note saying so. Such a file holds exactly one 3D volume (SPM and FSL write 3D images with
  ``dim[0] = 4, dim[4] = 1``), so refusing it would refuse common, unambiguous data; the note keeps
  the correction visible (``medgen-data check`` reports it as a warning).
"""

from __future__ import annotations

import gzip
import re
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["image_problem", "open_image", "read_failure", "short_error", "squeeze_trailing"]

_GZIP_MAGIC = b"\x1f\x8b"
#: NIfTI intent codes 3000-3099 are CIFTI-2's (dense/parcellated grayordinates, connectivity)
_CIFTI_INTENTS = range(3000, 3100)
#: nibabel's words for a file shorter than its header says: "Expected 67650 bytes, got 29648 bytes"
_SHORT_DATA = re.compile(r"Expected (\d+) bytes, got (\d+) bytes")
_PAIR_NAMES = {b"ni1": "NIfTI-1", b"ni2": "NIfTI-2"}


def short_error(exc: BaseException) -> str:
    """``"<type>: <first line of the message>"``, at most about 200 characters of message."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def open_image(path: str | Path) -> nib.spatialimages.SpatialImage:
    """The image at ``path`` (header parsed, voxels not yet read). A gzipped single-file NIfTI-1/2
    is decompressed in one call and parsed from memory (nibabel would stream it through
    ``GzipFile`` in small chunks); anything else goes through ``nib.load``."""
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(2)
        raw = magic + f.read() if magic == _GZIP_MAGIC else b""
    if raw:
        data = gzip.decompress(raw)
        del raw
        if len(data) >= 352:
            for order in "<>":
                sizeof_hdr = int(np.frombuffer(data, dtype=f"{order}i4", count=1)[0])
                if sizeof_hdr == 348 and data[344:348] == b"n+1\x00":
                    return nib.Nifti1Image.from_bytes(data)
                if sizeof_hdr == 540 and data[4:8] == b"n+2\x00":
                    return nib.Nifti2Image.from_bytes(data)
    return nib.load(str(path))


def _nifti_header(img: nib.spatialimages.SpatialImage):
    """The NIfTI header of ``img`` (a CIFTI-2 image keeps it apart from its XML header), or None."""
    header = getattr(img, "nifti_header", img.header)
    return header if isinstance(header, nib.Nifti1Header) else None  # Nifti2Header is a subclass


def _first_bytes(path: Path, n: int = 544) -> bytes:
    """The first ``n`` bytes of ``path``, decompressed when it is gzipped (b"" when unreadable)."""
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == _GZIP_MAGIC
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as f:
            return f.read(n)
    except (OSError, EOFError, zlib.error):
        return b""


def _raw_magic(head: bytes) -> bytes | None:
    """The magic of a header's first bytes as written on disk (nibabel mends a pair's magic when it
    opens it as a single file): ``b"n+1"``, ``b"ni1"``, ``b"n+2"``, ``b"ni2"``, ``b""`` for an
    Analyze 7.5 header (348 bytes, no NIfTI magic); None when ``head`` is none of these."""
    if len(head) < 348:
        return None
    for order in "<>":
        size = int(np.frombuffer(head, dtype=f"{order}i4", count=1)[0])
        if size == 348:
            magic = head[344:347]
            return magic if magic in (b"ni1", b"n+1") else b""
        if size == 540 and head[4:7] in (b"ni2", b"n+2"):
            return head[4:7]
    return None


def image_problem(path: str | Path, img: nib.spatialimages.SpatialImage) -> str | None:
    """Why the image ``img`` opened from ``path`` holds no volume medgen can use, or None."""
    header = _nifti_header(img)
    intent = int(header["intent_code"]) if header is not None else 0
    if isinstance(img, nib.Cifti2Image) or intent in _CIFTI_INTENTS:
        name = header.get_intent()[0] if header is not None else "unknown"
        return f"a CIFTI-2 file (surface/grayordinate data, intent {name}), not a volume"
    files = img.file_map
    if "header" in files and "image" in files and files["header"].filename != files["image"].filename:
        image_file = files["image"].filename  # a .hdr/.img pair (Analyze 7.5, NIfTI-1/2 pair)
        if image_file and not Path(image_file).exists():
            kind = _PAIR_NAMES.get(_magic(header), "Analyze 7.5")
            return f"the {kind} header of a .hdr/.img pair whose voxel file {Path(image_file).name} is missing"
    elif (raw := _raw_magic(_first_bytes(Path(path)))) in _PAIR_NAMES:
        # a pair's header under a single-file name (.nii): its voxels are in an .img elsewhere
        return (f"a {_PAIR_NAMES[raw]} .hdr header (magic {raw.decode()!r}) saved as a single file: "
                f"its voxels are in a separate .img file; convert the pair to one .nii.gz")
    dtype = np.dtype(img.get_data_dtype())
    if dtype.kind not in "biuf":
        what = "complex numbers" if dtype.kind == "c" else "colours (RGB)" if dtype.names else f"of type {dtype}"
        return f"voxels are {what}; expected a grayscale volume (one real number per voxel)"
    return None


def _header_kind(path: Path) -> str | None:
    """What a file nibabel could not type starts with: an Analyze 7.5 header, a pair header (magic
    ``ni1``/``ni2``), or None (no header nibabel reads as NIfTI or Analyze)."""
    raw = _raw_magic(_first_bytes(path))
    if raw is None or raw in (b"n+1", b"n+2"):
        return None
    return f"a {_PAIR_NAMES[raw]} .hdr header" if raw in _PAIR_NAMES else "an Analyze 7.5 header"


def _magic(header) -> bytes:
    return bytes(np.asarray(header["magic"]).item()).rstrip(b"\x00") if header is not None else b""


def read_failure(path: str | Path, exc: BaseException) -> str:
    """The true cause, in one line, of ``exc`` raised while reading the file ``path``."""
    path = Path(path)
    short = _SHORT_DATA.search(str(exc))
    if isinstance(exc, OSError) and short:
        return (f"truncated file: its header promises {short[1]} bytes of voxels, "
                f"the file holds {short[2]}")
    if isinstance(exc, EOFError):
        return f"truncated file: its gzip stream ends early ({short_error(exc)})"
    if isinstance(exc, (zlib.error, gzip.BadGzipFile)):
        return f"corrupt gzip stream ({short_error(exc)})"
    if path.is_file() and path.stat().st_size == 0:
        return "empty file (0 bytes)"
    if isinstance(exc, nib.filebasedimages.ImageFileError):
        kind = _header_kind(path)
        if kind:
            return f"{kind}, not a NIfTI file (no 'n+1'/'n+2' magic); convert it to .nii.gz"
        return f"not a NIfTI file ({short_error(exc)})"
    return f"unreadable file ({short_error(exc)})"


def squeeze_trailing(data: np.ndarray) -> tuple[np.ndarray, str | None]:
    """``data`` without its trailing singleton dimensions beyond the third (``(x, y, z, 1)`` ->
    ``(x, y, z)``), and a note saying so (None when there were none). Only trailing ones go: a
    singleton in the middle, ``(x, y, 1, t)``, is a 4D series and stays for the shape check."""
    shape = data.shape
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.shape == shape:
        return data, None
    dropped = len(shape) - data.ndim
    return data, (f"shape {tuple(int(n) for n in shape)} has {dropped} trailing singleton dimension(s): "
                  f"read as the 3D volume {tuple(int(n) for n in data.shape)}")
