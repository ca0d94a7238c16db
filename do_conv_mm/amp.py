"""bfloat16 mixed precision for mmengine training where AmpOptimWrapper cannot run (CPU).

mmengine's ``AmpOptimWrapper`` asserts a GPU/NPU/MLU/MUSA device (it is built around fp16 with a
``GradScaler``). bfloat16 has float32's exponent range, so it needs no loss scaling: all that is
left is running forward and loss under ``mmengine.runner.amp.autocast`` with bfloat16, which CPU
autocast supports. Parameters, gradients and optimizer state stay float32 (DOConv composes its
kernel in float32 even under autocast).
"""
from contextlib import contextmanager

import torch
import torch.nn as nn
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS
from mmengine.runner.amp import autocast

__all__ = ['BF16AmpOptimWrapper']


@OPTIM_WRAPPERS.register_module()
class BF16AmpOptimWrapper(OptimWrapper):
    """``OptimWrapper`` whose forward/loss run under bfloat16 autocast on the current device.

    Config: ``optim_wrapper=dict(type='BF16AmpOptimWrapper', optimizer=...)``; ``tools/train.py
    --amp`` selects it when no CUDA device is available. Checkpoints are those of OptimWrapper.
    """

    @contextmanager
    def optim_context(self, model: nn.Module):
        with super().optim_context(model), autocast(dtype=torch.bfloat16):
            yield
