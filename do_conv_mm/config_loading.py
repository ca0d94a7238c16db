"""Config files loaded with one-line errors that name what failed and the fix.

A config may not load because of the file itself (syntax, a bad ``_base_``, a child dict over a
base None) or because a package it inherits from (``_base_ = 'mmdet::...'``) or imports is not
installed; the fix differs, and so does the message.
"""
import re
from typing import Optional

from mmengine.config import Config

__all__ = ['PACKAGE_PINS', 'first_line', 'first_line_or_type', 'load_config_file',
           'package_to_install']

# The verified release of each OpenMMLab package a config can need, by scope and by pip name.
PACKAGE_PINS = {'mmdet': 'mmdet==3.3.0', 'mmseg': 'mmsegmentation==1.2.2',
                'mmsegmentation': 'mmsegmentation==1.2.2', 'mmpretrain': 'mmpretrain==1.2.0'}


def first_line(error: BaseException) -> str:
    """The first line of an error's message ('' for none): what a one-line report quotes."""
    text = str(error).strip()
    return text.splitlines()[0] if text else ''


def first_line_or_type(error: BaseException) -> str:
    """:func:`first_line`, or the error's type name where the message is empty (never '')."""
    return first_line(error) or type(error).__name__


def package_to_install(error: Exception) -> Optional[str]:
    """The package whose absence ``error`` reports (mmengine's "<pkg> is not installed" for a
    ``pkg::`` base, or a plain ModuleNotFoundError), else None."""
    if not isinstance(error, ImportError):
        return None
    found = re.match(r'(\S+) is not installed', first_line(error))
    if found:
        return found.group(1)
    name = getattr(error, 'name', None)
    return name.split('.')[0] if name else None


def load_config_file(path: str, error_type: type, what: str = 'config') -> Config:
    """``Config.fromfile(path)``; failing, raise ``error_type`` with one line: the loader's first
    line, and either the package to install or "fix the config file"."""
    try:
        return Config.fromfile(path)
    except Exception as error:
        package = package_to_install(error)
        if package is None:
            fix = 'fix the config file'
        elif package in PACKAGE_PINS:
            fix = (f'it needs {package}: pip install {PACKAGE_PINS[package]}, or bash '
                   f'tools/install.sh')
        else:
            fix = f'it needs {package}: install it'
        raise error_type(f'{what} {path!r} could not be loaded ({type(error).__name__}: '
                         f'{first_line(error)}); {fix}.') from None
