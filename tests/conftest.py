"""Test-suite configuration: the ``gpu`` marker.

Tests marked ``@pytest.mark.gpu`` need a CUDA device. Where ``torch.cuda.is_available()`` is
false they are skipped (never failed), so the suite passes on CPU-only machines and CI.
Run only them with ``python -m pytest tests -m gpu`` (what bench/gpu_check.sh does).
"""
import pytest


def pytest_configure(config):
    config.addinivalue_line(
        'markers', 'gpu: needs a CUDA device; skipped where torch.cuda.is_available() is false')


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker('gpu') is not None]
    if not gpu_items:
        return
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs CUDA (torch.cuda.is_available() is False)')
    for item in gpu_items:
        item.add_marker(skip)
