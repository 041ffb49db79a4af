"""Atomic file operations: everything is written under a temporary name in the target's own folder,
fsynced, then renamed, so a reader (or a resumed run) sees either the old file or the complete new
one, never a partial file under a final name."""
from __future__ import annotations

import os
import re
import shutil

_TMP = re.compile(r"\.tmp\.\d+$")


def tmp_name(path: str) -> str:
    """The temporary name a file or folder is written under before its rename (same folder, so the
    rename is atomic; the pid keeps two processes apart)."""
    d, base = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{base}.tmp.{os.getpid()}")


def is_tmp(name: str) -> bool:
    return _TMP.search(name) is not None


def fsync_dir(path: str) -> None:
    """Make renames inside `path` durable (best effort: some filesystems refuse directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: str, text: str) -> None:
    tmp = tmp_name(path)
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise


def copy_file(src: str, dst: str) -> None:
    """Copy a file's contents (following symlinks, as in a hub cache snapshot), atomically."""
    tmp = tmp_name(dst)
    try:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dst)
    except BaseException:
        remove(tmp)
        raise


def copy_tree(src: str, dst: str) -> None:
    """Copy a folder's contents (symlinks followed), atomically as a whole: dst appears complete or
    not at all."""
    tmp = tmp_name(dst)
    remove(tmp)
    try:
        shutil.copytree(src, tmp, symlinks=False)
        os.replace(tmp, dst)
    except BaseException:
        remove(tmp)
        raise


def remove(path: str) -> None:
    """Remove a file or a folder tree if it exists."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def inside(a: str, b: str) -> bool:
    """Is path a equal to or inside path b (real paths)?"""
    a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)
