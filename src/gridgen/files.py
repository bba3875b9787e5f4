"""Files every wing writes or lists: atomic replacement, natural sort order, the hash of a configuration.

A result is never half-written: :func:`atomic_path` hands out a hidden sibling (``.<name>.tmp-<pid>``) to write,
renames it onto the target only when the writing finished, and removes it otherwise, so a reader (or a crash)
sees the old file or the new one, never a mix. ``os.replace`` is atomic within one filesystem, and a sibling is
always on the target's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
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
