"""core/fs: atomic writes that leave nothing half-written and name the path a full disk stopped."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from medgen.core.fs import HOST, FileSystemError, atomic_write, is_orphan, os_error_line


def test_an_atomic_write_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "manifest.csv"
    with atomic_write(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".manifest.csv.tmp-")
        tmp.write_text("a,b\n")
        assert not target.exists()  # nothing under the final name until the block ends
    assert target.read_text() == "a,b\n" and [p.name for p in tmp_path.iterdir()] == ["manifest.csv"]


def test_a_full_disk_inside_the_block_names_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sample"
    with pytest.raises(FileSystemError) as caught:
        with atomic_write(target) as tmp:
            tmp.mkdir()
            (tmp / "bravo.nii.gz").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")  # gzip reports it without a file name
    assert caught.value.filename == str(target) and caught.value.errno == errno.ENOSPC
    assert os_error_line(caught.value) == (f"{target}: cannot write: No space left on device (free some space or "
                                           "choose another folder)")
    assert list(tmp_path.iterdir()) == []  # the half-written folder is gone, and nothing took the final name


def test_an_interrupt_inside_the_block_leaves_the_old_file(tmp_path):
    target = tmp_path / "status.json"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target) as tmp:
            tmp.write_text("new, half")
            raise KeyboardInterrupt
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["status.json"]


def test_a_temporary_is_an_orphan_when_its_owner_is_gone_or_it_names_none_and_is_old(tmp_path):
    """Names of this host say their process: a dead one's temporary is an orphan at once, a live one's
    is not. A name that names no owner is judged by age only, like another host's."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead, live = tmp_path / f".a.tmp-{HOST}-{gone.pid}-0a0b", tmp_path / f".b.tmp-{HOST}-{os.getpid()}-0a0b"
    unnamed = tmp_path / f".c.tmp-{gone.pid}"
    for path in (dead, live, unnamed):
        path.write_text("half")
    assert is_orphan(dead) and not is_orphan(live)
    assert not is_orphan(unnamed) and is_orphan(unnamed, max_age_s=-1.0)
