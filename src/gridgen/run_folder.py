"""A command's run folder when the command fails: what it held before the command wrote to it comes back byte for
byte (a folder the command made, with Hydra's files, goes). Used by every entry point whose output is a folder."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra.core.hydra_config import HydraConfig

log = logging.getLogger(__name__)


class RunFolderGuard:
    """What a run folder held before this command wrote to it, so that a command that fails before training a
    step leaves it byte for byte as it was: a new folder (only Hydra's files of this command) is removed; in an
    existing one (a resume in place) files this command added are removed and changed small files restored."""

    MAX_SAVED_BYTES = 16 * 2**20  # larger files (checkpoints of big LoRAs) are written only after a trained step

    def __init__(self, folder: Path, own: tuple[Path, ...] = (), root: Path | None = None) -> None:
        self.folder, self.own = folder, own  # own: files/folders this command's Hydra already wrote
        self.root = root  # empty folders between it and the run folder (outputs/runs/<date>) go with a new run
        self.existed = folder.is_dir()
        files = [p for p in folder.rglob("*") if p.is_file() and not self._is_own(p)] if self.existed else []
        # a folder with nothing but Hydra's files (of this command, or a folder Hydra made just now) is new
        self.new = not [p for p in files if ".hydra" not in p.relative_to(folder).parts and p.suffix != ".log"]
        self.dirs = {p for p in folder.rglob("*") if p.is_dir() and not self._is_own(p)} if self.existed else set()
        self.saved = {p: p.read_bytes() for p in files if p.stat().st_size <= self.MAX_SAVED_BYTES}
        self.stats = {p: _stat(p) for p in files}

    def _is_own(self, path: Path) -> bool:
        return any(path == own or own in path.parents for own in self.own)

    def restore(self) -> None:
        if not self.folder.is_dir():
            return
        if self.new:
            shutil.rmtree(self.folder, ignore_errors=True)
            for parent in self.folder.parents:
                if self.root is None or parent == self.root or self.root not in parent.parents or any(parent.iterdir()):
                    break
                parent.rmdir()
            return
        for path in sorted(self.folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if path.is_file() and path not in self.stats:
                path.unlink()
            elif path.is_dir() and path not in self.dirs:
                shutil.rmtree(path, ignore_errors=True)
        for own in self.own:  # the folders Hydra made for them (.hydra of a folder that had none), once empty
            for folder in own.parents:
                if folder == self.folder or self.folder not in folder.parents or any(folder.iterdir()):
                    break
                folder.rmdir()
        for path, stat in self.stats.items():
            if not path.is_file() or _stat(path) != stat:
                if path in self.saved:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(self.saved[path])
                else:
                    log.warning("%s changed during a failed resume and is too large to have been kept", path)


def hydra_files_of_this_command(output_dir: Path) -> tuple[Path, ...]:
    """What Hydra wrote for this command in a run folder resumed in place (its own config folder and log)."""
    if not HydraConfig.initialized():
        return ()
    config = HydraConfig.get()
    subdir = config.output_subdir or ""
    if "/resume-" not in subdir:
        return ()
    stamp = subdir.rpartition("/resume-")[2]
    return output_dir / subdir, output_dir / f"{config.job.name}.resume-{stamp}.log"


def _stat(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_size, info.st_mtime_ns


@contextmanager
def removed_on_failure(root: Path | None = None) -> Iterator[None]:
    """Inside ``@hydra.main``: a command that raises leaves no run folder of its own behind (its Hydra files, a
    half-written output), and an existing folder it wrote into as it was."""
    folder = Path(HydraConfig.get().runtime.output_dir)
    guard = RunFolderGuard(folder, hydra_files_of_this_command(folder), root=root)
    try:
        yield
    except BaseException:
        guard.restore()
        raise
