"""Files every wing writes or lists: atomic replacement, natural sort order, the hash of a configuration.

A result is never half-written: :func:`atomic_path` hands out a hidden sibling (``.<name>.tmp-<pid>``) to write,
renames it onto the target only when the writing finished, and removes it otherwise, so a reader (or a crash)
sees the old file or the new one, never a mix. ``os.replace`` is atomic within one filesystem, and a sibling is
always on the target's. :func:`atomic_folder` does the same for a folder of files (a saved model).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_NUMBER = re.compile(r"(\d+)")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """``with atomic_path(target) as tmp: write(tmp)``: ``tmp`` replaces ``target`` if the block succeeds."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when the block raised


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """``with atomic_folder(target) as tmp: write files into tmp``: the folder appears at ``target`` whole when the
    block succeeds (files and folders made readable as this process's umask allows: writers such as safetensors
    create 0600 files), and is removed when it raises. An existing ``target`` is swapped out (two renames, each
    atomic) and deleted afterwards, so ``target`` is always the old folder or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed writer of this pid
    tmp.mkdir()
    try:
        yield tmp
        for folder, _dirs, files in os.walk(tmp):
            os.chmod(folder, 0o777 & ~current_umask())
            for name in files:
                os.chmod(os.path.join(folder, name), default_file_mode())
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only left when the block raised


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file here (0644 under the usual umask 022): results are shared like
    checkpoints, whatever mode the library that wrote them chose."""
    return 0o666 & ~current_umask()


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through :func:`atomic_path`; the caller's own format (indent, key order,
    trailing newline) is the file's, so each kind of file keeps its bytes."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def natural_key(name: str | os.PathLike[str]) -> tuple:
    """Sort key that orders numbers by value: ``frame2.png`` < ``frame10.png`` (case-insensitive otherwise).

    The whole string counts, so relative paths (``clips/a2/x.mp4``) sort folder by folder; files of one folder
    sort by name whatever the folder is called.
    """
    return tuple(int(part) if part.isdigit() else part.lower() for part in _NUMBER.split(os.fspath(name)))


def config_hash(obj: Any) -> str:
    """16 hex digits of the SHA-256 of ``obj`` as canonical JSON (sorted keys; non-JSON values by ``str``)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
