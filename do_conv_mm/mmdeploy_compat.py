"""Run mmdeploy 1.3.1's ONNX export on torch >= 2.9 (used by ``tools/deploy_onnx.py``).

mmdeploy 1.3.1 (Dec 2023) was written for torch <= 2.1's TorchScript-based ONNX exporter. On the
torch of this stack (2.13) two things break, each fixed here for the duration of one export
and undone afterwards (nothing in site-packages is modified):

1. ``torch.onnx.export`` defaults to ``dynamo=True`` since torch 2.9. mmdeploy calls it without
   ``dynamo``, so the export goes to the torch.export-based exporter, which needs onnxscript and
   ignores everything mmdeploy does (function rewriters run, but its symbolic functions - NMS,
   RoIAlign, ... - are TorchScript-exporter symbolics). The shim passes ``dynamo=False``, the
   TorchScript exporter mmdeploy was written for (still shipped, deprecated, in torch 2.13).
2. ``torch.onnx.symbolic_opset9._cast_Long`` was removed; mmdeploy's RoIAlign symbolic for
   ONNX Runtime (two-stage detectors) imports it. The shim provides it (an ONNX ``Cast`` to
   int64, what the removed helper emitted).

One more is not about torch's version but about tracing mmseg (mmdeploy has no rewrite for it):

3. ``mmseg.models.utils.Upsample`` (FPNHead's scale heads) computes its output size as
   ``int(t * scale_factor)`` of the traced input shape; the dynamic-shape ONNX graph then computes
   wrong values at any other input shape (measured: toy Semantic FPN exported at 128x128, run at
   64x128: 1.1e-1 relative difference; at 128x128: 6e-7). For an integer ``scale_factor`` the
   shim interpolates with the scale factor instead, which gives the same output size
   (``int(t * k) == t * k``) and bit-identical PyTorch results, and exports as a Resize with
   constant scales that is right at every shape. Non-integer factors are left alone.

Use::

    with mmdeploy_export_compat():
        mmdeploy.apis.torch2onnx(...)
"""
import contextlib
import functools
from typing import Iterator, List, Tuple

__all__ = ['mmdeploy_export_compat', 'torchscript_export_kwargs', 'SHIMS']

# What the shim changes, for the README and the report: (name, reason).
SHIMS: List[Tuple[str, str]] = [
    ('torch.onnx.export(dynamo=False)',
     'torch >= 2.9 defaults to the torch.export-based exporter, which ignores mmdeploy\'s '
     'symbolics and needs onnxscript'),
    ('torch.onnx.symbolic_opset9._cast_Long',
     'removed helper imported by mmdeploy\'s RoIAlign symbolic'),
    ('mmseg.models.utils.Upsample.forward (integer scale_factor)',
     'int() of traced shapes made dynamic-shape FPNHead exports wrong at other shapes'),
]

_MISSING = object()


def _cast_long(g, input, non_blocking):  # noqa: A002  (torch's signature)
    """The removed ``symbolic_opset9._cast_Long``: ONNX Cast to int64 (TensorProto.INT64 = 7)."""
    return g.op('Cast', input, to_i=7)


@contextlib.contextmanager
def _patched(obj, name: str, value) -> Iterator[None]:
    old = getattr(obj, name, _MISSING)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if old is _MISSING:
            delattr(obj, name)
        else:
            setattr(obj, name, old)


def _upsample_forward(original):
    """mmseg Upsample.forward that interpolates by an integer scale factor, not by int() sizes."""

    @functools.wraps(original)
    def forward(self, x):
        factor = self.scale_factor
        if not self.size and isinstance(factor, (int, float)) and float(factor).is_integer():
            from mmseg.models.utils.wrappers import resize
            return resize(x, None, float(factor), self.mode, self.align_corners)
        return original(self, x)

    return forward


def torchscript_export_kwargs() -> dict:
    """The ``torch.onnx.export`` arguments that pick the TorchScript exporter: ``dynamo=False``
    where export has that switch (torch >= 2.5; on by default from 2.9), else none."""
    import torch.onnx
    return {'dynamo': False} if 'dynamo' in (torch.onnx.export.__kwdefaults__ or {}) else {}


@contextlib.contextmanager
def mmdeploy_export_compat() -> Iterator[None]:
    """Patch torch's ONNX entry points the way mmdeploy 1.3.1 expects them, then restore them."""
    import torch.onnx
    import torch.onnx.symbolic_opset9 as opset9
    with contextlib.ExitStack() as stack:
        export = torch.onnx.export
        torchscript = torchscript_export_kwargs()
        if torchscript:
            @functools.wraps(export)
            def export_torchscript(*args, **kwargs):
                return export(*args, **{**torchscript, **kwargs})
            stack.enter_context(_patched(torch.onnx, 'export', export_torchscript))
        if not hasattr(opset9, '_cast_Long'):
            stack.enter_context(_patched(opset9, '_cast_Long', _cast_long))
        try:
            from mmseg.models.utils.wrappers import Upsample
        except ImportError:  # mmseg not installed: nothing to patch
            Upsample = None
        if Upsample is not None:
            stack.enter_context(_patched(Upsample, 'forward',
                                         _upsample_forward(Upsample.forward)))
        yield
