"""A detector's / segmentor's dense head and a two-stage detector's RoI head as modules that
return tensors only, so they export to ONNX beside ``end2end.onnx`` and compare densely.
"""
from copy import deepcopy
from typing import Any, List, Tuple

import torch
import torch.nn as nn

__all__ = ['RawHeadOutputs', 'RoIHeadOutputs', 'proposal_rois', 'two_stage', 'onnx_name']


class RawHeadOutputs(nn.Module):
    """``model``'s dense head forward on its features, flattened to a tuple of tensors.

    Detectors: ``rpn_head`` (two-stage) or ``bbox_head``; segmentors: ``decode_head``.
    """

    def __init__(self, model: nn.Module, task: str):
        super().__init__()
        self.model = model
        if task == 'seg':
            self.head_name = 'decode_head'
        elif getattr(model, 'with_rpn', False) and hasattr(model, 'rpn_head'):
            self.head_name = 'rpn_head'
        else:
            self.head_name = 'bbox_head'
        self.names: List[str] = []

    def forward(self, inputs: torch.Tensor):
        feats = self.model.extract_feat(inputs)
        outputs = getattr(self.model, self.head_name)(feats)
        flat: List[Tuple[str, torch.Tensor]] = []
        _flatten(outputs, self.head_name, flat)
        self.names = [name for name, _ in flat]
        return tuple(t for _, t in flat)


class RoIHeadOutputs(nn.Module):
    """A two-stage detector's RoI head on given RoIs: ``(cls_score, bbox_pred)``.

    Exported as ``roi_outputs.onnx`` (inputs ``input`` and ``rois`` (N, 5): batch index, x1, y1,
    x2, y2), so ONNX Runtime and PyTorch can be compared on the *same* proposals: the RoI stage
    densely, independent of the proposal selection (see :class:`.OnnxRuntimeComparer`).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, rois: torch.Tensor):
        feats = self.model.extract_feat(inputs)
        result = self.model.roi_head._bbox_forward(feats, rois)
        return result['cls_score'], result['bbox_pred']


def proposal_rois(model: nn.Module, inputs: torch.Tensor, samples) -> torch.Tensor:
    """PyTorch's RPN proposals for ``inputs`` as RoIs (N, 5)."""
    from mmdet.structures.bbox import bbox2roi
    feats = model.extract_feat(inputs)
    proposals = model.rpn_head.predict(feats, deepcopy(samples), rescale=False)
    return bbox2roi([p.bboxes for p in proposals])


def two_stage(model: nn.Module) -> bool:
    return bool(getattr(model, 'with_rpn', False)) and hasattr(model, 'roi_head')


def _flatten(obj: Any, name: str, out: List[Tuple[str, torch.Tensor]]) -> None:
    if isinstance(obj, torch.Tensor):
        out.append((name, obj))
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            _flatten(item, f'{name}[{i}]', out)


def onnx_name(name: str) -> str:
    return name.replace('[', '_').replace(']', '').replace('.', '_')
