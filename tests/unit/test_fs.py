"""core/fs: atomic writes that leave nothing half-written and name the path a full disk stopped."""

from __future__ import annotations

import errno

import pytest

from medgen.core.fs import FileSystemError, atomic_write, os_error_line


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
