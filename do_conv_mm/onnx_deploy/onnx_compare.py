"""ONNX Runtime vs PyTorch on one preprocessed input: raw head maps, RoI head, detections or
segmentation logits and labels (criteria: :mod:`.onnx_deploy`).
"""
from copy import deepcopy
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..deploy_verify import compare_outputs, format_diffs
from .detection_match import match_detections, match_line, mmdeploy_detections, sample_detections
from .head_outputs import proposal_rois

__all__ = ['OnnxRuntimeComparer']


def _det_test_cfg(model: nn.Module) -> Tuple[float, Optional[int]]:
    """(score threshold, max detections per image) of the final stage's test_cfg."""
    if getattr(model, 'with_rpn', False) and hasattr(model, 'roi_head'):
        cfg = model.roi_head.test_cfg
    else:
        cfg = model.bbox_head.test_cfg
    cfg = cfg or {}
    return float(cfg.get('score_thr', 0.0)), cfg.get('max_per_img')


def _label_agreement(ref_logits: torch.Tensor, ort_logits: torch.Tensor, atol: float,
                     rtol: float) -> Dict[str, Any]:
    """Argmax agreement; a differing pixel is explained when its top-2 logits nearly tie."""
    ref64, ort64 = ref_logits.double(), ort_logits.double()
    differ = ref64.argmax(1) != ort64.argmax(1)
    top2 = ref64.topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1]
    tol = 2 * (atol + rtol * float(ref64.abs().max()))
    unexplained = int((differ & (margin > tol)).sum())
    return dict(pixels=int(differ.numel()), differing=int(differ.sum()),
                unexplained=unexplained, tie_tolerance=tol, ok=unexplained == 0)


class OnnxRuntimeComparer:
    """Runs one preprocessed input through ONNX Runtime and PyTorch and compares (see onnx_deploy).

    Dense: raw head maps (``raw_outputs.onnx`` vs the PyTorch head forward); segmentation logits
    (``end2end.onnx`` vs ``encode_decode``); two-stage detectors: the RoI head on PyTorch's
    proposals (``roi_outputs.onnx``). Detections: ``end2end.onnx`` vs the PyTorch model running
    the *same* function (mmdeploy's rewritten forward and post-processing, under its
    RewriterContext), asserted; and ONNX Runtime's final predictions vs mmdet's own ``predict``
    (its own post-processing), reported (mmdeploy's RPN runs one NMS over all levels where mmdet
    runs one per level).
    """

    def __init__(self, task, torch_model, raw_module, names, raw_session, backend_model, dcfg,
                 atol, rtol, score_atol, box_atol, log, roi_module=None, roi_session=None):
        self.task, self.torch_model, self.raw_module = task, torch_model, raw_module
        self.names, self.raw_session, self.backend_model = names, raw_session, backend_model
        self.dcfg, self.log = dcfg, log
        self.roi_module, self.roi_session = roi_module, roi_session
        self.atol, self.rtol, self.score_atol, self.box_atol = atol, rtol, score_atol, box_atol
        self.results: Dict[str, Dict[str, Any]] = {}

    @torch.no_grad()
    def __call__(self, data, inputs, key: str) -> List[str]:
        result: Dict[str, Any] = dict(shape=list(inputs.shape))
        self.results[key] = result
        failures = []
        ref = self.raw_module(inputs)
        ort_raw = self.raw_session.run(self.names, {'input': inputs.numpy()})
        diffs = compare_outputs(
            {n: t for n, t in zip(self.raw_module.names, ref)},
            {n: torch.from_numpy(a) for n, a in zip(self.raw_module.names, ort_raw)},
            self.atol, self.rtol)
        result['raw_outputs'] = diffs
        self.log(f'[{key} {tuple(inputs.shape)}] raw head outputs, ONNX Runtime vs PyTorch:\n'
                 + format_diffs(diffs, self.atol, self.rtol))
        failures += [f'{key} raw {d.name}' for d in diffs if not d.ok]
        samples = data['data_samples']
        if self.roi_session is not None:
            rois = proposal_rois(self.torch_model, inputs, samples)
            ref_roi = self.roi_module(inputs, rois)
            ort_roi = self.roi_session.run(['cls_score', 'bbox_pred'],
                                           {'input': inputs.numpy(), 'rois': rois.numpy()})
            roi_diffs = compare_outputs(
                {'cls_score': ref_roi[0], 'bbox_pred': ref_roi[1]},
                {'cls_score': torch.from_numpy(ort_roi[0]),
                 'bbox_pred': torch.from_numpy(ort_roi[1])}, self.atol, self.rtol)
            result['roi_outputs'] = roi_diffs
            result['num_rois'] = int(rois.shape[0])
            self.log(f'[{key}] RoI head on the same {rois.shape[0]} proposals, ONNX Runtime vs '
                     f'PyTorch:\n' + format_diffs(roi_diffs, self.atol, self.rtol))
            failures += [f'{key} roi {d.name}' for d in roi_diffs if not d.ok]
        end2end = self.backend_model.wrapper({'input': inputs})
        if self.task == 'det':
            failures += self._detections(data, inputs, samples, end2end, result, key)
        else:
            failures += self._segmentation(inputs, samples, end2end, result, key)
        return failures

    def _detections(self, data, inputs, samples, end2end, result, key) -> List[str]:
        score_thr, max_per_img = _det_test_cfg(self.torch_model)
        dets, labels = _rewritten_detections(self.torch_model, inputs, samples, self.dcfg)
        ort = mmdeploy_detections(end2end['dets'], end2end['labels'])
        match = match_detections(mmdeploy_detections(dets, labels), ort, score_thr, max_per_img,
                                 self.score_atol, self.box_atol)
        result['detections'] = match
        self.log(f'[{key}] detections, ONNX Runtime vs PyTorch (same post-processing): '
                 f'{match_line(match)}')
        mmdet_ref = self.torch_model(inputs, deepcopy(samples), mode='predict')
        ort_pred = self.backend_model(inputs, deepcopy(samples), mode='predict')
        vs_mmdet = match_detections(sample_detections(mmdet_ref[0]), sample_detections(ort_pred[0]),
                                    score_thr, max_per_img, self.score_atol, self.box_atol)
        result['detections_vs_mmdet'] = vs_mmdet
        self.log(f'[{key}] final detections, ONNX Runtime vs mmdet\'s own predict '
                 f'(reported): {match_line(vs_mmdet, checked=False)}')
        return [] if match['ok'] else [f'{key} detections']

    def _segmentation(self, inputs, samples, end2end, result, key) -> List[str]:
        ort_out = end2end[self.backend_model.output_names[0]]
        ref_logits = self.torch_model.encode_decode(inputs, [s.metainfo for s in samples])
        failures = []
        if ort_out.shape[1] == ref_logits.shape[1]:  # logits (with_argmax=False)
            diffs = compare_outputs({'seg_logits': ref_logits}, {'seg_logits': ort_out},
                                    self.atol, self.rtol)
            result['seg_logits'] = diffs
            self.log(f'[{key}] segmentation logits, ONNX Runtime vs PyTorch:\n'
                     + format_diffs(diffs, self.atol, self.rtol))
            failures += [f'{key} {d.name}' for d in diffs if not d.ok]
            labels = _label_agreement(ref_logits, ort_out, self.atol, self.rtol)
        else:  # labels (with_argmax=True)
            differ = ref_logits.argmax(1, keepdim=True) != ort_out
            labels = dict(pixels=int(differ.numel()), differing=int(differ.sum()),
                          unexplained=int(differ.sum()), ok=not bool(differ.any()))
        result['seg_labels'] = labels
        self.log(f'[{key}] segmentation labels: {labels["differing"]} of {labels["pixels"]} '
                 f'pixels differ, {labels["unexplained"]} not at a logit tie -> '
                 f'{"PASS" if labels["ok"] else "FAIL"}')
        if not labels['ok']:
            failures.append(f'{key} seg_labels')
        return failures


def _rewritten_detections(model, inputs, samples, dcfg):
    """(dets, labels) of ``model`` run in PyTorch with mmdeploy's rewrites (the exported
    function: same pre-NMS top-k, NMS and top-k as the ONNX graph)."""
    from mmdeploy.core import RewriterContext, patch_model
    from mmdeploy.utils import IR
    opset = dcfg.onnx_config.get('opset_version', 11)
    patched = patch_model(model, cfg=dcfg, backend='onnxruntime', ir=IR.ONNX)
    with RewriterContext(cfg=dcfg, backend='onnxruntime', ir=IR.ONNX, opset=opset):
        dets, labels = patched(inputs, deepcopy(samples), mode='predict')[:2]
    return dets, labels
