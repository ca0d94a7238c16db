"""Timing (median ms per call after a warm-up) and test-set evaluation of a model: the PyTorch
model or mmdeploy's ONNX Runtime backend model, one image per batch."""
import statistics
import time
from copy import deepcopy
from typing import Any, Callable, Dict, Tuple

import numpy as np
import torch
import torch.nn as nn
from mmengine.config import Config

__all__ = ['median_ms', 'evaluate_on_test_set']


def median_ms(fn: Callable[[], Any], runs: int) -> float:
    """Median wall time of ``fn()`` in ms over ``runs`` calls (at least 1) after one warm-up."""
    fn()  # warm-up (ORT allocates its arena, PyTorch its buffers)
    times = []
    for _ in range(max(1, runs)):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def evaluate_on_test_set(model: nn.Module, cfg: Config) -> Tuple[Dict[str, float], float]:
    """The config's test evaluator over its test set with ``model``, one image per batch;
    (metrics, seconds)."""
    from mmengine.evaluator import Evaluator
    from mmengine.registry import DefaultScope
    from mmengine.runner import Runner
    start = time.perf_counter()
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope')):
        loader_cfg = deepcopy(cfg.test_dataloader)
        loader_cfg['batch_size'] = 1  # the static deploy configs export batch 1
        loader = Runner.build_dataloader(loader_cfg)
        evaluator = Evaluator(deepcopy(cfg.test_evaluator))
        evaluator.dataset_meta = getattr(loader.dataset, 'metainfo', None)
        with torch.no_grad():
            for data in loader:
                evaluator.process(data_samples=model.test_step(data), data_batch=data)
        metrics = evaluator.evaluate(len(loader.dataset))
    return ({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, np.number))},
            time.perf_counter() - start)
