"""The slice cache survives a killed build (no worker left, the partial folder removed by the next
run) and checks itself when opened (a corrupt cache is rebuilt with a warning naming its folder)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from datagen import write_dataset

from medgen.data import item_cache
from medgen.data.loading import build_dataloader
from medgen.data.slices import ItemCache, SliceSpec, open_or_build_cache

SPEC = SliceSpec(("bravo", "seg"), 32, "brain")


@pytest.fixture(scope="module")
def patients(tmp_path_factory) -> list[Path]:
    return write_dataset(tmp_path_factory.mktemp("robust") / "d", n_patients=3, keys=("bravo", "seg"))


def _assert_same(a: ItemCache, b: ItemCache) -> None:
    assert a.shape == b.shape and a.keys == b.keys and a.patient_ids == b.patient_ids
    np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))
    for name in ("patient_index", "slice_index", "lesion_pixels"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def _leftovers(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in (cache_dir / "slices").glob(".*.tmp-*"))


# ------------------------------------------------------------------------------ a killed build
_BUILD_SCRIPT = r"""
import os, sys, time
from pathlib import Path
import medgen.data.slices as slices

data, cache_dir, signals = (Path(a) for a in sys.argv[1:4])
real = slices._patient_slices

def slow(folder, *args, **kwargs):  # in a worker: say so, then take long enough to be killed mid-way
    (signals / f"worker-{os.getpid()}").touch()
    time.sleep(0.5)
    return real(folder, *args, **kwargs)

slices._patient_slices = slow
patients = sorted((data / "train").iterdir())
slices.open_or_build_cache(patients, slices.SliceSpec(("bravo", "seg"), 128, "brain"), cache_dir,
                           progress=False, workers=2)
"""


def _processes_marked(marker: bytes) -> list[int]:
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes():
                pids.append(int(environ.parent.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_during_a_build_leaves_no_worker_and_the_next_run_cleans_up(tmp_path, caplog):
    """At 128 px a patient's slices overflow a pipe's buffer: a worker left with a result nobody
    reads would block on it for good when it exits (unless it dies with its parent)."""
    patients = write_dataset(tmp_path / "d", n_patients=12, keys=("bravo", "seg"))
    cache_dir, signals = tmp_path / "cache", tmp_path / "signals"
    signals.mkdir()
    token = secrets.token_hex(8)
    env = {**os.environ, "MEDGEN_TEST_MARK": token}
    proc = subprocess.Popen([sys.executable, "-c", _BUILD_SCRIPT, str(tmp_path / "d"), str(cache_dir), str(signals)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = f"MEDGEN_TEST_MARK={token}".encode()
    try:
        deadline = time.monotonic() + 120
        while len(list(signals.iterdir())) < 2:  # both workers are busy with a patient
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the build never started its two workers"
            time.sleep(0.05)
        assert len(_processes_marked(marker)) == 3  # the build and its two workers
        partial = _leftovers(cache_dir)
        assert len(partial) == 1 and f"-{proc.pid}-" in partial[0]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 5
        while (alive := _processes_marked(marker)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert alive == [], f"worker processes {alive} outlived the killed build"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert _leftovers(cache_dir) == partial  # the partial folder is still there ...

    caplog.set_level(logging.WARNING)
    spec = SliceSpec(("bravo", "seg"), 128, "brain")
    cache = open_or_build_cache(patients, spec, cache_dir, progress=False)
    assert _leftovers(cache_dir) == []  # ... until the next run removes it, saying so
    assert f"removed {cache_dir / 'slices' / partial[0]}, left by an interrupted run" in caplog.text
    _assert_same(cache, open_or_build_cache(patients, spec, tmp_path / "fresh", progress=False))


def test_training_loader_workers_die_with_their_parent():
    loader = build_dataloader(list(range(8)), 2, shuffle=True, seed=0, num_workers=2)
    init = pickle.loads(pickle.dumps(loader.worker_init_fn))  # picklable for spawn-started workers too
    assert init.args == (os.getpid(),)
    assert build_dataloader(list(range(8)), 2, shuffle=True, seed=0).worker_init_fn is None


# ------------------------------------------------------------------------------ a cache that checks itself
def _garbage_meta(d: Path) -> None:
    (d / "meta.json").write_bytes(b"\x00\x9f{not json" * 10)


def _meta_not_an_object(d: Path) -> None:
    (d / "meta.json").write_text("[1, 2, 3]")


def _truncated_index(d: Path) -> None:
    f = d / "index.npz"
    os.truncate(f, f.stat().st_size // 2)


def _truncated_slices(d: Path) -> None:
    f = d / "items.bin"
    os.truncate(f, f.stat().st_size - 100)


def _missing_slices(d: Path) -> None:
    (d / "items.bin").unlink()


def _random_slices(d: Path) -> None:
    f = d / "items.bin"
    f.write_bytes(np.random.default_rng(0).bytes(f.stat().st_size))


def _one_changed_row(d: Path) -> None:  # the first block is always read
    with open(d / "items.bin", "r+b") as f:
        f.write(b"\x7f" * 64)


def _no_checksum(d: Path) -> None:  # meta.json without the checksum it is completed with
    meta = json.loads((d / "meta.json").read_text())
    del meta["checksum"]
    (d / "meta.json").write_text(json.dumps(meta, indent=1))


def _edited_meta(d: Path) -> None:
    meta = json.loads((d / "meta.json").read_text())
    meta["patient_ids"] = list(reversed(meta["patient_ids"]))
    (d / "meta.json").write_text(json.dumps(meta, indent=1))


@pytest.mark.parametrize("corrupt, reason", [
    (_garbage_meta, "meta.json is not valid JSON"),
    (_meta_not_an_object, "meta.json does not describe a slice cache"),
    (_truncated_index, "index.npz is unreadable"),
    (_truncated_slices, "items.bin has"),
    (_missing_slices, "items.bin is missing"),
    (_random_slices, "do not match the checksum"),
    (_one_changed_row, "do not match the checksum"),
    (_no_checksum, "meta.json does not describe a slice cache"),
    (_edited_meta, "do not match the checksum"),
])
def test_a_corrupt_cache_is_rebuilt_with_a_warning_naming_it(tmp_path, patients, caplog, corrupt, reason):
    fresh = open_or_build_cache(patients, SPEC, tmp_path / "fresh", progress=False)
    cache_dir = tmp_path / "cache"
    directory = open_or_build_cache(patients, SPEC, cache_dir, progress=False).directory
    corrupt(directory)
    caplog.set_level(logging.WARNING)
    cache = open_or_build_cache(patients, SPEC, cache_dir, progress=False)
    assert cache.directory == directory
    _assert_same(cache, fresh)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(directory) in warnings[0] and reason in warnings[0], warnings
    assert _leftovers(cache_dir) == []  # the bad folder was moved aside and deleted
    caplog.clear()
    _assert_same(open_or_build_cache(patients, SPEC, cache_dir, progress=False), fresh)  # and now it is fine
    assert not caplog.records


def test_random_bytes_are_caught_where_the_slices_file_is_sampled(tmp_path, patients, monkeypatch, caplog):
    """With small blocks the slices file is larger than the sample: random bytes of the right size
    are still caught, and the sample is the first block, the last, and evenly spaced ones."""
    monkeypatch.setattr(item_cache, "_SAMPLE_BLOCK_BYTES", 256)
    directory = open_or_build_cache(patients, SPEC, tmp_path / "c", progress=False).directory
    size = (directory / "items.bin").stat().st_size
    offsets = item_cache._sample_offsets(size)
    assert size > 64 * 256 and len(offsets) == 64 and offsets[0] == 0 and offsets[-1] == size - 256
    _random_slices(directory)
    caplog.set_level(logging.WARNING)
    cache = open_or_build_cache(patients, SPEC, tmp_path / "c", progress=False)
    assert str(directory) in caplog.text and "do not match the checksum" in caplog.text
    assert np.isfinite(np.asarray(cache.data, dtype=np.float32)).all()


def test_a_cache_replaced_after_its_check_is_put_back_not_deleted(tmp_path, patients):
    """Two processes: one found the old folder bad, the other replaced it meanwhile with a good
    one; the first must not delete the good one when it moves 'the bad folder' aside."""
    directory = open_or_build_cache(patients, SPEC, tmp_path / "c", progress=False).directory
    other = tmp_path / "elsewhere"
    other.mkdir()
    item_cache._discard(directory, other.stat())  # what the first process saw was another folder
    assert ItemCache.is_complete(directory) and _leftovers(tmp_path / "c") == []
    ItemCache(directory)  # opens, checked
    item_cache._discard(directory, directory.stat())  # the folder it saw: moved aside and deleted
    assert not directory.exists() and _leftovers(tmp_path / "c") == []


def test_opening_a_large_cache_reads_only_a_sample(tmp_path, patients, monkeypatch):
    """The check reads the index and the metadata, and 64 blocks of a slices file larger than that."""
    monkeypatch.setattr(item_cache, "_SAMPLE_BLOCK_BYTES", 256)
    directory = open_or_build_cache(patients, SPEC, tmp_path / "c", progress=False).directory
    read = []
    real = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, offset: read.append(n) or real(fd, n, offset))
    ItemCache(directory)
    assert read == [256] * 64 and (directory / "items.bin").stat().st_size > 4 * 64 * 256
