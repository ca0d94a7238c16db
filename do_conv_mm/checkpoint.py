"""Safe loading of mmengine training checkpoints (torch >= 2.6 by default, and on older torch).

torch >= 2.6 loads with ``weights_only=True`` by default, and mmengine 0.10.x calls ``torch.load``
without ``weights_only``, so its full training checkpoints (``message_hub`` holds mmengine
``HistoryBuffer`` objects with numpy arrays, numpy scalars and numpy dtypes) fail to resume, test
or ``load_from``. Rather than turning safe loading off, :func:`allow_mmengine_checkpoint_types`
allow-lists exactly the types such checkpoints hold (found by saving real Runner checkpoints and
reading ``torch.serialization.get_unsafe_globals_in_checkpoint``); torch's restricted unpickler
stays in charge of everything else.

:func:`load_checkpoint_file` is the safe loader for our own tools: it returns the checkpoint dict
or raises :class:`CheckpointError` with one line naming the problem and the fix. torch < 2.4 has
no allow-list, and its weights-only unpickler cannot rebuild objects such as HistoryBuffer; there
the file is read by :func:`restricted_pickle_module`, a standard unpickler that resolves only
the globals torch's weights-only loader allows plus the same list.
"""
import _compat_pickle
import codecs
import os
import pickle
import re
import types
import zipfile
from typing import Any, Dict, Optional, Union

import numpy as np
import torch

__all__ = ['CheckpointError', 'allow_mmengine_checkpoint_types', 'key_listing',
           'load_checkpoint_file', 'mmengine_checkpoint_types', 'restricted_pickle_module',
           'safe_torch_load']

# Statistics functions HistoryBuffer pickles by reference (``getattr(HistoryBuffer, 'mean')``).
_HISTORY_BUFFER_METHODS = ('min', 'max', 'current', 'mean')

# numpy dtype classes whose instances may be rebuilt: the numeric ones, nothing that holds objects.
_NUMPY_DTYPE_CLASSES = ('BoolDType', 'Int8DType', 'Int16DType', 'Int32DType', 'Int64DType',
                        'UInt8DType', 'UInt16DType', 'UInt32DType', 'UInt64DType',
                        'Float16DType', 'Float32DType', 'Float64DType', 'LongDoubleDType',
                        'Complex64DType', 'Complex128DType', 'CLongDoubleDType', 'ByteDType',
                        'UByteDType', 'ShortDType', 'UShortDType', 'IntDType', 'UIntDType',
                        'LongDType', 'ULongDType', 'LongLongDType', 'ULongLongDType')


class CheckpointError(ValueError):
    """A checkpoint file that cannot be (safely) loaded; the message names the problem and fix."""


def _history_buffer_getattr(obj: Any, name: str) -> Any:
    """Stand-in for ``builtins.getattr`` during safe loading.

    mmengine's HistoryBuffer pickles its statistics methods as ``getattr(HistoryBuffer, 'mean')``.
    Only that lookup is served: HistoryBuffer's own statistics functions, or ones registered
    through ``HistoryBuffer.register_statistics``. Any other getattr is refused.
    """
    from mmengine.logging import HistoryBuffer
    allowed = set(_HISTORY_BUFFER_METHODS) | set(HistoryBuffer._statistics_methods)
    if obj is HistoryBuffer and isinstance(name, str) and name in allowed:
        value = getattr(HistoryBuffer, name)
        if callable(value):
            return value
    raise pickle.UnpicklingError(
        f'Refused getattr({getattr(obj, "__qualname__", type(obj).__name__)}, {name!r}): '
        f'only HistoryBuffer statistics methods may be looked up while loading a checkpoint.')


def mmengine_checkpoint_types() -> list:
    """The safe globals mmengine checkpoints need, in ``add_safe_globals`` form.

    Entries are objects or ``(object, 'dotted.name.in.the.pickle')`` pairs; the pairs map
    numpy 1.x names (``numpy.core``) onto numpy 2.x objects and ``builtins.getattr`` onto
    :func:`_history_buffer_getattr`.
    """
    from mmengine.logging import HistoryBuffer
    try:
        from numpy._core import multiarray  # numpy 2; numpy 1.26 maps it onto numpy.core
    except ImportError:  # numpy < 1.26
        from numpy.core import multiarray
    types = [
        HistoryBuffer,
        np.ndarray,
        np.dtype,
        (multiarray._reconstruct, 'numpy._core.multiarray._reconstruct'),
        (multiarray._reconstruct, 'numpy.core.multiarray._reconstruct'),
        (multiarray.scalar, 'numpy._core.multiarray.scalar'),
        (multiarray.scalar, 'numpy.core.multiarray.scalar'),
        (_history_buffer_getattr, 'builtins.getattr'),
    ]
    dtypes_module = getattr(np, 'dtypes', None)  # numpy >= 1.25
    if dtypes_module is not None:
        types += [getattr(dtypes_module, name) for name in _NUMPY_DTYPE_CLASSES
                  if hasattr(dtypes_module, name)]
    return types


def allow_mmengine_checkpoint_types() -> None:
    """Allow-list the types of mmengine checkpoints for ``torch.load(weights_only=True)``.

    Idempotent (torch keeps a set). Called on ``import do_conv_mm``, so configs with
    ``custom_imports=dict(imports=['do_conv_mm'])`` resume, test and ``load_from`` full training
    checkpoints with any OpenMMLab tool, while torch's safe unpickler keeps refusing anything else.
    """
    add_safe_globals = getattr(torch.serialization, 'add_safe_globals', None)
    if add_safe_globals is None:  # torch < 2.4 has no weights_only default to satisfy
        return
    add_safe_globals(mmengine_checkpoint_types())


def restricted_pickle_module() -> types.ModuleType:
    """A ``pickle_module`` for ``torch.load`` on torch < 2.4: ``find_class`` serves only the
    globals of torch's own weights-only loader and :func:`mmengine_checkpoint_types`, and
    refuses any other ("GLOBAL x was not an allowed global"), before it could run."""
    from torch import _weights_only_unpickler
    allowed = dict(_weights_only_unpickler._get_allowed_globals())
    # protocol 2 pickles bytes (numpy scalars' data) as _codecs.encode(str, 'latin1'); newer
    # torch's weights-only loader allows it too
    allowed['_codecs.encode'] = codecs.encode
    for entry in mmengine_checkpoint_types():
        obj, name = entry if isinstance(entry, tuple) else (
            entry, f'{entry.__module__}.{entry.__qualname__}')
        allowed[name] = obj

    class Unpickler(pickle.Unpickler):

        def find_class(self, module_name, name):
            # protocol 2 (torch.save's) names Python 2 modules: __builtin__.getattr
            if (module_name, name) in _compat_pickle.NAME_MAPPING:
                module_name, name = _compat_pickle.NAME_MAPPING[(module_name, name)]
            module_name = _compat_pickle.IMPORT_MAPPING.get(module_name, module_name)
            found = allowed.get(f'{module_name}.{name}')
            if found is None:  # named as torch's own loader names it (builtins unqualified)
                shown = name if module_name == 'builtins' else f'{module_name}.{name}'
                raise pickle.UnpicklingError(f'GLOBAL {shown} was not an allowed global')
            return found

    module = types.ModuleType('do_conv_mm_restricted_pickle')
    module.Unpickler = Unpickler
    module.load = lambda file, **kwargs: Unpickler(file, **kwargs).load()
    return module


def safe_torch_load(path: str, map_location: Any = 'cpu') -> Any:
    """``torch.load`` with the allow-list: torch's weights-only loader where torch has
    ``add_safe_globals`` (>= 2.4), else :func:`restricted_pickle_module`."""
    if hasattr(torch.serialization, 'add_safe_globals'):
        allow_mmengine_checkpoint_types()
        return torch.load(path, map_location=map_location, weights_only=True)
    return torch.load(path, map_location=map_location, pickle_module=restricted_pickle_module(),
                      weights_only=False)


def _file_kind(path: str) -> str:
    """'zip' (torch >= 1.6 format), 'pickle' (legacy format), 'plain pickle' (pickle.dump, not
    torch.save), 'safetensors', 'empty' or 'other'."""
    with open(path, 'rb') as f:
        head = f.read(12)
    if not head:
        return 'empty'
    if head.startswith(b'PK\x03\x04'):
        return 'zip'
    if head[0] == 0x80:  # pickle protocol opcode; torch's legacy format pickles its magic number
        first = head[11:12] if head[2:3] == b'\x95' else head[2:3]  # after a protocol-4 FRAME
        return 'pickle' if first == b'\x8a' else 'plain pickle'
    if len(head) >= 9 and head[8:9] == b'{':  # 8-byte little-endian header size, then JSON
        return 'safetensors'
    return 'other'


# File kinds (:func:`_file_kind`) refused before torch.load, with the problem and the fix.
_NOT_LOADABLE = {
    'empty': ('Checkpoint {path!r} is empty (0 bytes), probably an interrupted save; use an '
              'earlier checkpoint or save it again.'),
    'other': ('{path!r} is not a torch checkpoint (no zip or pickle header); pass a .pth file '
              'written by torch.save / mmengine.'),
    'plain pickle': ('{path!r} is a Python pickle (pickle.dump), not a torch checkpoint; save '
                     'the weights with torch.save(model.state_dict(), path).'),
    'safetensors': ('{path!r} is a safetensors file, not a torch checkpoint; convert it: '
                    'torch.save(safetensors.torch.load_file(path), "model.pth").'),
}


def load_checkpoint_file(path: Union[str, os.PathLike],
                         map_location: Any = 'cpu',
                         *,
                         config: Any = None) -> Dict[str, Any]:
    """Load a checkpoint with torch's safe unpickler (``weights_only=True``) and the allow-list.

    Args:
        path: a ``.pth`` file written by ``torch.save`` (a full mmengine training checkpoint,
            a ``{'state_dict': ...}`` file or a bare state dict).
        map_location: as for ``torch.load``; CPU by default.
        config: the config (``mmengine.Config``, dict or config path) the weights are meant for.
            When given, an unfolded DO-Conv checkpoint with a config that has no DO-Conv layer
            (a deploy/plain config) is refused (see ``do_conv_mm.checkpoint_guard``): mmengine
            would load it non-strictly, drop ``D`` and compute a different function.

    Returns:
        The saved dict, unchanged (e.g. keys ``meta``, ``state_dict``, ``message_hub``, ...).

    Raises:
        CheckpointError: one line naming the problem and the fix, for a missing path, a directory,
            a file that is not a torch checkpoint, a truncated or corrupt file, a file whose
            content is not a dict, or one that needs types outside the allow-list (refused before
            anything from the file ran); with ``config``, also a train/deploy mix-up.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f'Checkpoint {path!r} does not exist; check the path (a work dir '
                              f'names its latest checkpoint in its "last_checkpoint" file).')
    if os.path.isdir(path):
        found = sorted(n for n in os.listdir(path) if n.endswith('.pth'))
        hint = f' it holds {", ".join(found[:5])}' if found else ' it holds no .pth file'
        raise CheckpointError(f'Checkpoint {path!r} is a directory ({hint.strip()}); pass the '
                              f'.pth file itself.')
    kind = _file_kind(path)
    if kind in _NOT_LOADABLE:
        raise CheckpointError(_NOT_LOADABLE[kind].format(path=path))
    if kind == 'zip' and not zipfile.is_zipfile(path):
        raise CheckpointError(f'Checkpoint {path!r} is truncated or corrupt (its zip directory is '
                              f'missing); copy or save it again.')
    if kind == 'zip':
        damaged = _damaged_zip_member(path)
        if damaged:
            raise CheckpointError(f'Checkpoint {path!r} is corrupt ({damaged}); copy or save it '
                                  f'again.')
    try:
        checkpoint = safe_torch_load(path, map_location)
    except pickle.UnpicklingError as error:
        reason = _unpickler_reason(str(error))
        if reason.startswith(('the global', 'getattr(')) or 'allowlisted' in reason:
            raise CheckpointError(
                f'Refused to load {path!r}: it needs {reason}, which is outside the safe '
                f'allow-list; nothing from the file was executed. Save a state_dict '
                f'checkpoint instead, or if you trust the file allow-list that type with '
                f'torch.serialization.add_safe_globals (torch >= 2.4).') from None
        raise CheckpointError(f'Checkpoint {path!r} is corrupt ({reason}); copy or save '
                              f'it again.') from None
    except Exception as error:  # any other failure inside torch.load means a damaged file
        raise CheckpointError(f'Checkpoint {path!r} is truncated or corrupt '
                              f'({type(error).__name__}: {_short(str(error))}); copy or save it '
                              f'again.') from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'Checkpoint {path!r} holds a {type(checkpoint).__name__}, not a '
                              f'dict; save model.state_dict() (or an mmengine checkpoint) instead.')
    if config is not None:
        from .checkpoint_guard import check_checkpoint_config
        if isinstance(config, (str, os.PathLike)):
            from mmengine.config import Config
            config = Config.fromfile(os.fspath(config))
        check_checkpoint_config(checkpoint, config, path)
    return checkpoint


def _damaged_zip_member(path: str) -> Optional[str]:
    """None, or what is damaged in a torch zip checkpoint: torch.load does not check the CRC-32
    that torch.save records for every record, so flipped bytes in tensor data would load.
    Records stored with CRC 0 are not checked (torch's ``compute_crc32=False`` option)."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0:
                    continue
                with archive.open(info) as record:  # reading to the end checks the CRC
                    while record.read(1 << 24):
                        pass
    except zipfile.BadZipFile as error:
        if 'CRC' in str(error):
            return f'the data of {info.filename!r} fails its CRC check'
        return f'BadZipFile: {_short(str(error))}'
    except (OSError, EOFError, ValueError) as error:
        return f'{type(error).__name__}: {_short(str(error))}'
    return None


def _unpickler_reason(message: str) -> str:
    """The specific reason inside torch's multi-line 'Weights only load failed' message."""
    match = re.search(r'GLOBAL (\S+) was not an allowed global', message)
    if match:
        return f'the global {match.group(1)}'
    match = re.search(r'unsupported GLOBAL (\S+) whose module \S+ is blocked', message)
    if match:
        return f'the global {match.group(1)}'
    match = re.search(r'Refused (getattr\([^)]*\))', message)
    if match:
        return match.group(1)
    match = re.search(r'WeightsUnpickler error:\s*(.*)', message)
    return _short(match.group(1) if match else message)


def _short(text: str, limit: int = 160) -> str:
    """First line of an error message, cut to ``limit`` characters."""
    line = text.strip().splitlines()[0] if text.strip() else ''
    return line if len(line) <= limit else line[:limit - 3] + '...'


def key_mismatch(expected, state_dict):
    """(missing, unexpected, mis-shaped) keys of ``state_dict`` against ``expected`` (a model's
    state dict), each in its dict's order."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [k for k, v in expected.items()
                 if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    return missing, unexpected, misshaped


def key_listing(keys, limit: int = 3) -> str:
    """The first ``limit`` keys for an error line: ``a, b, c, ... (12 more)``."""
    keys = [str(k) for k in keys]
    shown = ', '.join(keys[:limit])
    return shown + (f', ... ({len(keys) - limit} more)' if len(keys) > limit else '')


# Active from ``import do_conv_mm`` on, so every OpenMMLab tool that custom-imports us can resume.
allow_mmengine_checkpoint_types()
