"""What an exported graph may hold: standard-domain ONNX ops only (no Einsum, no custom or DO-Conv
op); and, before a dynamic-shape export, no padding that mmcv computes from the input size.
"""
import os
from typing import Dict

import torch.nn as nn

from ..checkpoint import key_listing
from .onnx_errors import DeployError

__all__ = ['STANDARD_DOMAINS', 'FORBIDDEN_OPS', 'onnx_ops', 'check_ops',
           'refuse_dynamic_same_padding']

STANDARD_DOMAINS = ('', 'ai.onnx')
FORBIDDEN_OPS = ('Einsum', )


def onnx_ops(path: str) -> Dict[str, int]:
    """Op counts of an ONNX file, ``domain::op`` for ops outside the standard domain."""
    import onnx
    model = onnx.load(path)
    onnx.checker.check_model(model)
    counts: Dict[str, int] = {}
    for node in model.graph.node:
        name = node.op_type if node.domain in STANDARD_DOMAINS else f'{node.domain}::{node.op_type}'
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def check_ops(path: str, ops: Dict[str, int]) -> None:
    """DeployError where ``ops`` (:func:`onnx_ops` of ``path``) has a custom, Einsum or DO-Conv
    op."""
    custom = [op for op in ops if '::' in op]
    forbidden = [op for op in ops if op in FORBIDDEN_OPS or 'doconv' in op.lower()]
    if custom or forbidden:
        raise DeployError(f'{os.path.basename(path)} contains non-standard ops '
                          f'{sorted(custom + forbidden)}; export a folded model (plain convs) with '
                          f'a configs/deploy/*_onnxruntime_* config.')


def refuse_dynamic_same_padding(model: nn.Module) -> None:
    """A dynamic-shape export cannot keep mmcv Conv2dAdaptivePadding's TensorFlow 'SAME' padding
    where it depends on the input size (strided k×k convs: EfficientNet's downsamplings). mmcv
    computes it in Python, so the exported graph holds the padding of the export size and other
    sizes give wrong outputs (measured: a 16×16 input came out 5×5 instead of 8×8). Stride-1
    and 1×1 layers pad the same at every size. Refused before exporting."""
    from mmcv.cnn.bricks import Conv2dAdaptivePadding
    names = [name for name, m in model.named_modules() if isinstance(m, Conv2dAdaptivePadding)
             and any(s > 1 and (k - 1) * d > 0
                     for s, k, d in zip(m.stride, m.kernel_size, m.dilation))]
    if names:
        raise DeployError(
            f"a dynamic-shape export cannot keep the 'SAME' padding of {len(names)} strided "
            f'Conv2dAdaptivePadding layer(s) ({key_listing(names)}): mmcv computes it from the '
            f'input size in Python, so the export would hold the padding of one size and give '
            f'wrong outputs at others (a plain model of this architecture has the same limit). '
            f'Export statically at the size you deploy: drop --dynamic (and give --shape H W).')
