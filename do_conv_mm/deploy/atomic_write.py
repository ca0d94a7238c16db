"""Atomic file writes: a target is either its old file or the whole new one, never half-written.

:class:`StagedFiles` writes each file under a temporary name in its target's directory (made
if missing) with the usual permissions; ``commit`` renames them all (``os.replace``),
``discard`` removes them and the directories it made.
"""
import os
import tempfile
from typing import Any, List, Tuple

import torch
from mmengine.config import Config

__all__ = ['StagedFiles', 'save_atomically']


class StagedFiles:
    """Files written under temporary names next to their targets; ``commit`` renames them all."""

    def __init__(self):
        self._files: List[Tuple[str, str]] = []
        self._made_dirs: List[str] = []

    def _temp(self, target: str, suffix: str) -> str:
        directory = os.path.dirname(os.path.abspath(target))
        missing = []
        probe = directory
        while not os.path.exists(probe):
            missing.append(probe)
            probe = os.path.dirname(probe)
        os.makedirs(directory, exist_ok=True)
        self._made_dirs += reversed(missing)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f'.{os.path.basename(target)}.',
                                   suffix=suffix)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        self._files.append((tmp, target))
        return tmp

    def torch_save(self, obj: Any, target: str) -> str:
        tmp = self._temp(target, '.tmp')
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def config(self, cfg: Config, target: str, header: str = '') -> str:
        """``cfg.dump`` staged for ``target``, ``header`` (comment lines) first."""
        tmp = self._temp(target, os.path.splitext(target)[1] or '.py')
        cfg.dump(tmp)
        if header:
            with open(tmp, encoding='utf-8') as f:
                text = f.read()
            with open(tmp, 'w', encoding='utf-8') as f:
                f.write(header + text)
        return tmp

    def commit(self) -> None:
        for tmp, target in self._files:
            os.replace(tmp, target)
        self._files = []
        self._made_dirs = []

    def discard(self) -> None:
        for tmp, _ in self._files:
            if os.path.exists(tmp):
                os.unlink(tmp)
        for directory in reversed(self._made_dirs):
            try:
                os.rmdir(directory)
            except OSError:
                pass
        self._files = []
        self._made_dirs = []


def save_atomically(obj: Any, target: str) -> None:
    """``torch.save(obj, target)`` under a temporary name, renamed when complete: ``target``
    is either the old file or the whole new one, never half-written."""
    staged = StagedFiles()
    try:
        staged.torch_save(obj, target)
        staged.commit()
    finally:
        staged.discard()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
