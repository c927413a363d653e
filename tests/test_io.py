"""Output writing (g2is_jax.io): atomic files leave nothing behind on failure, a file set is
committed as one, output paths are checked before work, OS errors read as one line."""

import errno
import os

import pytest

from g2is_jax import io as gio
from g2is_jax.errors import G2ISError


def _names(d):
    return sorted(p.name for p in d.iterdir())


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "a.json"
    gio.atomic_write_json(path, {"x": 1})
    assert path.read_text() == '{\n "x": 1\n}\n'
    with pytest.raises(RuntimeError):
        with gio.atomic_open(path, "w") as f:
            f.write("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == '{\n "x": 1\n}\n'  # the old file, untouched
    assert _names(path.parent) == ["a.json"]  # no temporary file left


def test_full_disk_is_one_line_naming_the_path(tmp_path, monkeypatch):
    path = tmp_path / "out.jsonl"
    path.write_text("old\n")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(G2ISError, match="no space left on the device holding .*out.jsonl") as e:
        gio.atomic_write(path, "new\n")
    assert "\n" not in str(e.value)
    monkeypatch.undo()
    assert path.read_text() == "old\n" and _names(tmp_path) == ["out.jsonl"]


@pytest.mark.parametrize("code, match", [
    (errno.EROFS, "read-only file system"),
    (errno.EACCES, "permission denied"),
    (errno.ENOTDIR, "is a file, not a directory"),
    (errno.EISDIR, "is a directory"),
    (errno.EIO, "cannot write"),
])
def test_os_error_messages(code, match):
    err = gio.os_error("/x/y", OSError(code, os.strerror(code)))
    assert match in str(err) and "/x/y" in str(err) and "\n" not in str(err)


def test_output_checks_create_nothing(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    with pytest.raises(G2ISError, match="is a directory"):
        gio.check_output_file(tmp_path / "dir", "--out")
    with pytest.raises(G2ISError, match="is a file, not a directory"):
        gio.check_output_dir(tmp_path / "file", "--out")
    with pytest.raises(G2ISError, match="is a file, not a directory"):
        gio.check_output_file(tmp_path / "file" / "deeper" / "x.json", "--out")
    with pytest.raises(G2ISError, match="is a file, not a directory"):
        gio.check_output_dir(tmp_path / "file" / "sub", "--out")
    assert gio.check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert gio.check_output_file(tmp_path / "new.json") == tmp_path / "new.json"
    assert _names(tmp_path) == ["dir", "file"]


def test_read_only_location_is_named(tmp_path, monkeypatch):
    # As root, a chmod'ed directory stays writable: simulate a read-only mount instead.
    class RO:
        f_flag = os.ST_RDONLY

    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    monkeypatch.setattr(os, "statvfs", lambda p: RO())
    with pytest.raises(G2ISError, match="read-only file system; choose a writable location"):
        gio.check_output_dir(tmp_path / "out", "--out")
    with pytest.raises(G2ISError, match="read-only file system"):
        gio.check_output_file(tmp_path / "x.jsonl", "--out")


def test_file_set_removes_stale_members_and_commits_last(tmp_path):
    d = tmp_path / "sel"
    gio.write_file_set(d, {"selected.jsonl": b"a\n", "selection.json": "{}\n"},
                       commit="selection.json")
    assert _names(d) == ["selected.jsonl", "selection.json"]
    # A second write without the subset: the stale subset goes with the old selection.
    gio.write_file_set(d, {"selected.jsonl": None, "selection.json": '{"v": 2}\n'},
                       commit="selection.json")
    assert _names(d) == ["selection.json"] and (d / "selection.json").read_text() == '{"v": 2}\n'


def test_file_set_failure_leaves_the_old_set_whole(tmp_path, monkeypatch):
    d = tmp_path / "sel"
    gio.write_file_set(d, {"selected.jsonl": b"old\n", "selection.json": "old\n"},
                       commit="selection.json")

    def boom(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    # The disk fills while the members are written: nothing of the old set is touched.
    with pytest.raises(G2ISError, match="no space left"):
        gio.write_file_set(d, {"selected.jsonl": boom, "selection.json": "new\n"},
                           commit="selection.json")
    assert _names(d) == ["selected.jsonl", "selection.json"]
    assert (d / "selection.json").read_text() == "old\n"

    # Killed between the renames: the commit file is gone, never next to a stale member.
    real = os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if str(dst).endswith("selection.json"):
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        gio.write_file_set(d, {"selected.jsonl": b"new\n", "selection.json": "new\n"},
                           commit="selection.json")
    monkeypatch.undo()
    assert [os.path.basename(c) for c in calls] == ["selected.jsonl", "selection.json"]
    assert _names(d) == ["selected.jsonl"]  # no selection.json claims the new subset is whole
