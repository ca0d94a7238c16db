"""Checks before a tool writes an output file: never over an input, only into a writable
directory, and over an existing file only where the tool wrote it (a rerun) or with --force.

Each refusal is a one-line :class:`.FoldError`.
"""
import os
import tempfile
from typing import Callable, Optional, Sequence

from ..checkpoint import load_checkpoint_file
from .fold_errors import FoldError

__all__ = ['same_file', 'check_writable_dir', 'checkpoint_meta_has', 'check_checkpoint_output',
           'check_replaceable']


def same_file(a: str, b: str) -> bool:
    """Whether paths ``a`` and ``b`` name one file (same real path, or the same inode)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_writable_dir(path: str, what: str) -> None:
    """``path``'s directory is writable (created later if missing): probed, not assumed."""
    directory = os.path.dirname(os.path.abspath(path))
    probe = directory
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise FoldError(f'{what} {path!r} cannot be written: {probe!r} is a file, not a '
                        f'directory; choose an OUT path inside a directory.')
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix='.fold_doconv_probe_')
        os.close(fd)
        os.unlink(tmp)
    except OSError as error:
        raise FoldError(f'{what} {path!r} cannot be written: directory {probe!r} is not writable '
                        f'({error.strerror}); choose a writable OUT directory.') from None
    if os.path.isdir(path):
        raise FoldError(f'{what} {path!r} is an existing directory; pass a file path.')


def checkpoint_meta_has(path: str, key: str) -> bool:
    """Whether ``path`` is a checkpoint whose ``meta[key]`` is set (a tool's own output)."""
    try:
        meta = load_checkpoint_file(path).get('meta')
    except Exception:  # not a checkpoint at all: foreign
        return False
    return isinstance(meta, dict) and bool(meta.get(key))


def check_checkpoint_output(out: str, inputs: Sequence[Optional[str]], meta_key: str,
                            overwrite: bool = False) -> None:
    """Before a tool writes the checkpoint ``out``: it is none of ``inputs``, its directory is
    writable, and an existing file there is replaced only if it is this tool's own output (its
    ``meta[meta_key]`` set: a rerun) or with ``overwrite`` (--force)."""
    for source in inputs:
        if source and same_file(out, source):
            raise FoldError(f'OUT {out!r} is the same file as the input {source!r}; write to a '
                            f'new path (inputs are never modified).')
    check_writable_dir(out, 'OUT')
    if not overwrite:
        check_replaceable(out, 'OUT', lambda path: checkpoint_meta_has(path, meta_key),
                          'a checkpoint')


def check_replaceable(path: str, what: str, ours: Callable[[str], bool], kind: str) -> None:
    """An existing file at an output path is replaced only if this tool wrote it (a rerun)."""
    if os.path.isfile(path) and not ours(path):
        raise FoldError(f'{what} {path!r} exists and is not {kind} this tool wrote; nothing was '
                        f'written. Pass another path, or --force (overwrite=True) to replace '
                        f'it.')
