"""Export a DO-Conv model through mmdeploy to ONNX and check it in ONNX Runtime.

The API of ``tools/deploy_onnx.py`` (runs where the ``deploy`` extra is installed: mmdeploy 1.3.1,
onnxruntime, onnx; see README, Deployment). :func:`deploy_onnx`:

1. loads the checkpoint safely and refuses train/deploy mix-ups (:mod:`.checkpoint_guard`);
2. folds a DO-Conv training checkpoint first (:func:`do_conv_mm.fold_checkpoint`, which also
   writes the deploy config), or takes an already folded / plain checkpoint with its deploy /
   plain config as it is; the weights must strict-load into the deploy model;
3. exports with mmdeploy (``torch2onnx``, under :func:`.mmdeploy_compat.mmdeploy_export_compat`)
   to ``end2end.onnx`` (detections or segmentation output, mmdeploy's post-processing included)
   and, through mmdeploy's ``export`` with the same deploy config, ``raw_outputs.onnx``: the
   dense head's raw maps (``bbox_head``/``rpn_head``/``decode_head`` forward on the features);
4. checks both graphs: ONNX checker, standard-domain ops only (no Einsum, no custom op);
5. runs both in ONNX Runtime (the end-to-end model through mmdeploy's backend model, the way
   mmdeploy's tools run it; the raw model through a plain ``onnxruntime.InferenceSession``
   without any custom-op library) on the input the test pipeline makes of one image, and the
   folded PyTorch model on the same input, and compares (criteria below);
6. optionally evaluates both on the config's test set (``evaluate``);
7. writes everything atomically into OUT_DIR, with ``deploy_report.json``.

Tolerances (fp32; ORT and PyTorch use different conv kernels and summation orders):

* dense outputs (raw head maps, segmentation logits): ``max|ort - torch| <= atol + rtol *
  max|torch|`` per output, the fold tool's criterion, with the same defaults ``rtol=1e-4``,
  ``atol=1e-5``. Measured ORT-vs-PyTorch differences are 1e-7 .. 1e-6 of the output's scale (see
  README); a wrong export (a dropped D, a wrong kernel) is O(1e-1).
* two-stage detectors, in addition: the RoI head's ``cls_score``/``bbox_pred`` on PyTorch's
  proposals (``roi_outputs.onnx``), densely as above, so the RoI stage (ONNX ``RoiAlign``) is
  checked on the same boxes, independent of proposal selection.
* detections: ``end2end.onnx`` is compared with the PyTorch model running the same function
  (mmdeploy's rewritten forward and post-processing, in PyTorch under its RewriterContext).
  Every detection must have a counterpart of the same label with ``|score diff| <= score_atol``
  (1e-4: scores are sigmoid/softmax outputs <= 1, so this is the dense criterion on the score
  map) and box coordinates within ``box_atol`` pixels (default 1e-2 px: a box is decoded from
  deltas through exp() and scaled by the anchor size, so a relative error of 1e-6 .. 1e-5
  becomes <= 1e-3 px on 128 px - 1333 px images); and vice versa. A detection may be unmatched
  only where it is a tie the two runtimes may break differently: its score within
  ``score_atol`` of the score threshold or of the last kept score. ONNX Runtime's final
  predictions are also matched against mmdet's own ``predict`` and reported (mmdeploy's RPN
  post-processing differs from mmdet's for two-stage detectors; see README).
* segmentation labels (argmax): pixels may differ only where PyTorch's top two logits are within
  the dense tolerance of each other.
"""
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from copy import deepcopy
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from mmengine.config import Config

from .checkpoint import CheckpointError, key_listing, key_mismatch, load_checkpoint_file
from .checkpoint_guard import check_checkpoint_config, config_has_doconv
from .config_loading import first_line_or_type, load_config_file
from .deploy_verify import DEFAULT_ATOL, DEFAULT_RTOL, OutputDiff, compare_outputs, format_diffs

__all__ = ['DeployError', 'DeployVerificationError', 'deploy_onnx', 'default_deploy_config',
           'DEPLOY_CONFIG_DIR', 'DEFAULT_SCORE_ATOL', 'DEFAULT_BOX_ATOL', 'onnx_ops',
           'match_detections']

DEFAULT_SCORE_ATOL = 1e-4
DEFAULT_BOX_ATOL = 1e-2  # pixels
STANDARD_DOMAINS = ('', 'ai.onnx')
FORBIDDEN_OPS = ('Einsum', )
REPORT = 'deploy_report.json'
END2END = 'end2end.onnx'
RAW = 'raw_outputs.onnx'
ROI = 'roi_outputs.onnx'


def _find_deploy_config_dir() -> str:
    """The checkout's configs/deploy (an editable install), else the copy a wheel carries."""
    here = os.path.dirname(os.path.abspath(__file__))
    checkout = os.path.join(os.path.dirname(here), 'configs', 'deploy')
    for candidate in (checkout, os.path.join(here, '.mim', 'configs', 'deploy')):
        if os.path.isdir(candidate):
            return candidate
    return checkout


DEPLOY_CONFIG_DIR = _find_deploy_config_dir()


class DeployError(ValueError):
    """An expected, user-fixable problem; the message is one line naming it and the fix."""


class DeployVerificationError(DeployError):
    """``verify`` found ONNX Runtime outputs beyond tolerance; ``report`` holds everything."""

    def __init__(self, message: str, report: Dict[str, Any]):
        super().__init__(message)
        self.report = report


# ------------------------------------------------------------------------------------------------
# Environment and configs
# ------------------------------------------------------------------------------------------------
def _require_deploy_stack() -> Dict[str, str]:
    """Versions of the deploy extra; a one-line error where it is missing."""
    import importlib.metadata as md
    missing = []
    for module in ('mmdeploy', 'onnxruntime', 'onnx'):
        try:
            __import__(module)
        except ImportError as error:
            missing.append(f'{module} ({error})')
    if missing:
        raise DeployError(
            f'the deploy extra is not installed in this Python ({sys.executable}): missing '
            f'{", ".join(missing)}; run bash tools/install_deploy.sh and use '
            f'.venv-deploy/bin/python tools/deploy_onnx.py ... (README, Deployment).')
    versions = {}
    for name in ('torch', 'mmengine', 'mmcv', 'mmdet', 'mmsegmentation', 'mmdeploy',
                 'onnxruntime', 'onnx', 'protobuf', 'numpy'):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return versions


def default_deploy_config(task: str, dynamic: bool = False) -> str:
    """The shipped mmdeploy config for ``task`` ('det' / 'seg') on ONNX Runtime."""
    name = {'det': 'detection', 'seg': 'segmentation'}[task]
    return os.path.join(DEPLOY_CONFIG_DIR,
                        f'{name}_onnxruntime_{"dynamic" if dynamic else "static"}.py')


def _task_of(cfg: Config) -> str:
    scope = cfg.get('default_scope')
    if scope == 'mmdet':
        return 'det'
    if scope == 'mmseg':
        return 'seg'
    raise DeployError(f'CONFIG\'s default_scope is {scope!r}; deploy_onnx exports mmdet and mmseg '
                      f'models (default_scope "mmdet" or "mmseg").')


def _load_cfg(path: str, what: str) -> Config:
    if not os.path.isfile(path):
        state = 'is a directory' if os.path.isdir(path) else 'does not exist'
        raise DeployError(f'{what} {path!r} {state}; pass a config file (.py).')
    return load_config_file(path, DeployError, what)


def _load_deploy_cfg(path: str, task: str, shape: Optional[Sequence[int]]) -> Config:
    cfg = _load_cfg(path, '--deploy-cfg')
    backend = cfg.get('backend_config', {}).get('type')
    if backend != 'onnxruntime':
        raise DeployError(f'--deploy-cfg {path!r} targets backend {backend!r}; this tool exports '
                          f'for and runs ONNX Runtime: pass a config with '
                          f'backend_config=dict(type="onnxruntime") (configs/deploy/).')
    if cfg.get('onnx_config', {}).get('type') != 'onnx':
        raise DeployError(f'--deploy-cfg {path!r} has no onnx_config of type "onnx"; pass one of '
                          f'configs/deploy/*_onnxruntime_*.py.')
    codebase = cfg.get('codebase_config', {}).get('type')
    expected = {'det': 'mmdet', 'seg': 'mmseg'}[task]
    if codebase != expected:
        raise DeployError(f'--deploy-cfg {path!r} is for {codebase!r} but CONFIG is an '
                          f'{expected} config; pass {os.path.relpath(default_deploy_config(task))} '
                          f'or its _dynamic twin.')
    if shape is not None and not _is_dynamic(cfg):
        cfg.onnx_config['input_shape'] = [int(shape[1]), int(shape[0])]  # mmdeploy: (W, H)
    return cfg


def _is_dynamic(deploy_cfg: Config) -> bool:
    from mmdeploy.utils import is_dynamic_shape
    return bool(is_dynamic_shape(deploy_cfg))


# ------------------------------------------------------------------------------------------------
# ONNX graph checks
# ------------------------------------------------------------------------------------------------
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


def _check_ops(path: str, ops: Dict[str, int]) -> None:
    custom = [op for op in ops if '::' in op]
    forbidden = [op for op in ops if op in FORBIDDEN_OPS or 'doconv' in op.lower()]
    if custom or forbidden:
        raise DeployError(f'{os.path.basename(path)} contains non-standard ops '
                          f'{sorted(custom + forbidden)}; export a folded model (plain convs) with '
                          f'a configs/deploy/*_onnxruntime_* config.')


# ------------------------------------------------------------------------------------------------
# Raw head outputs as a module
# ------------------------------------------------------------------------------------------------
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
    densely, independent of the proposal selection (see :class:`_Comparer`).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, rois: torch.Tensor):
        feats = self.model.extract_feat(inputs)
        result = self.model.roi_head._bbox_forward(feats, rois)
        return result['cls_score'], result['bbox_pred']


def _proposal_rois(model: nn.Module, inputs: torch.Tensor, samples) -> torch.Tensor:
    """PyTorch's RPN proposals for ``inputs`` as RoIs (N, 5)."""
    from mmdet.structures.bbox import bbox2roi
    feats = model.extract_feat(inputs)
    proposals = model.rpn_head.predict(feats, deepcopy(samples), rescale=False)
    return bbox2roi([p.bboxes for p in proposals])


def _two_stage(model: nn.Module) -> bool:
    return bool(getattr(model, 'with_rpn', False)) and hasattr(model, 'roi_head')


def _flatten(obj: Any, name: str, out: List[Tuple[str, torch.Tensor]]) -> None:
    if isinstance(obj, torch.Tensor):
        out.append((name, obj))
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            _flatten(item, f'{name}[{i}]', out)


def _onnx_name(name: str) -> str:
    return name.replace('[', '_').replace(']', '').replace('.', '_')


# ------------------------------------------------------------------------------------------------
# Comparisons
# ------------------------------------------------------------------------------------------------
def match_detections(ref: Dict[str, np.ndarray], ort: Dict[str, np.ndarray], score_thr: float,
                     max_per_img: Optional[int], score_atol: float = DEFAULT_SCORE_ATOL,
                     box_atol: float = DEFAULT_BOX_ATOL) -> Dict[str, Any]:
    """Match two detection sets (``bboxes`` (N, 4), ``scores`` (N,), ``labels`` (N,)).

    Greedy by descending reference score: each reference detection takes the unused ORT
    detection of the same label with the closest box among those within ``box_atol`` and
    ``score_atol``. Unmatched detections on either side are allowed only at a tie the runtimes
    may break differently (score within ``score_atol`` of ``score_thr``, or of the lowest kept
    score when ``max_per_img`` detections were kept). Returns the counts, the worst matched
    differences and ``ok``.
    """
    used = np.zeros(len(ort['scores']), dtype=bool)
    worst_box, worst_score, matched = 0.0, 0.0, 0
    unmatched_ref = []
    for i in np.argsort(-ref['scores'], kind='stable'):
        candidates = np.flatnonzero(
            (~used) & (ort['labels'] == ref['labels'][i])
            & (np.abs(ort['scores'] - ref['scores'][i]) <= score_atol)
            & (np.abs(ort['bboxes'] - ref['bboxes'][i]).max(axis=1, initial=0) <= box_atol))
        if len(candidates) == 0:
            unmatched_ref.append(int(i))
            continue
        box_diff = np.abs(ort['bboxes'][candidates] - ref['bboxes'][i]).max(axis=1)
        j = candidates[int(np.argmin(box_diff))]
        used[j] = True
        matched += 1
        worst_box = max(worst_box, float(box_diff.min()))
        worst_score = max(worst_score, float(abs(ort['scores'][j] - ref['scores'][i])))
    unmatched_ort = [int(j) for j in np.flatnonzero(~used)]

    def at_tie(scores: np.ndarray, index: int) -> bool:
        score = float(scores[index])
        if abs(score - score_thr) <= score_atol:
            return True
        full = max_per_img is not None and len(scores) >= max_per_img
        return full and abs(score - float(scores.min())) <= score_atol

    unexplained = ([i for i in unmatched_ref if not at_tie(ref['scores'], i)]
                   + [j for j in unmatched_ort if not at_tie(ort['scores'], j)])
    return dict(num_ref=int(len(ref['scores'])), num_ort=int(len(ort['scores'])),
                matched=matched, unmatched_ref=len(unmatched_ref),
                unmatched_ort=len(unmatched_ort), unexplained=len(unexplained),
                max_box_diff=worst_box, max_score_diff=worst_score,
                score_atol=score_atol, box_atol=box_atol, ok=not unexplained)


def _detections(sample) -> Dict[str, np.ndarray]:
    pred = sample.pred_instances
    return dict(bboxes=pred.bboxes.detach().cpu().double().numpy().reshape(-1, 4),
                scores=pred.scores.detach().cpu().double().numpy().reshape(-1),
                labels=pred.labels.detach().cpu().numpy().reshape(-1))


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


# ------------------------------------------------------------------------------------------------
# Input, timing, evaluation
# ------------------------------------------------------------------------------------------------
def _default_image(cfg: Config, shape: Optional[Sequence[int]], log) -> Tuple[Any, str]:
    """The test set's first image when its files exist, else a seeded random image."""
    from mmengine.registry import DATASETS, DefaultScope
    from .toy_data import ensure_toy_data_for_config
    try:
        ensure_toy_data_for_config(cfg)
        with DefaultScope.overwrite_default_scope(cfg.get('default_scope')):
            import importlib
            importlib.import_module(f'{cfg.default_scope}.datasets')
            dataset = DATASETS.build(deepcopy(cfg.test_dataloader.dataset))
            path = dataset.get_data_info(0)['img_path']
        if os.path.isfile(path):
            return path, path
    except Exception as error:  # no dataset on this machine: random input is the fallback
        log(f'test set not available ({type(error).__name__}: {first_line_or_type(error)[:100]}); '
            f'using a seeded random image')
    height, width = (int(v) for v in (shape or (128, 128)))
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return img, f'random uint8 image {height}x{width} (seed 0)'


def _median_ms(fn: Callable[[], Any], runs: int) -> float:
    fn()  # warm-up (ORT allocates its arena, PyTorch its buffers)
    times = []
    for _ in range(max(1, runs)):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _evaluate(model: nn.Module, cfg: Config) -> Tuple[Dict[str, float], float]:
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


class _Comparer:
    """Runs one preprocessed input through ONNX Runtime and PyTorch and compares (see module doc).

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
            rois = _proposal_rois(self.torch_model, inputs, samples)
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
        ort = _dets_labels(end2end['dets'], end2end['labels'])
        match = match_detections(_dets_labels(dets, labels), ort, score_thr, max_per_img,
                                 self.score_atol, self.box_atol)
        result['detections'] = match
        self.log(f'[{key}] detections, ONNX Runtime vs PyTorch (same post-processing): '
                 f'{_match_line(match)}')
        mmdet_ref = self.torch_model(inputs, deepcopy(samples), mode='predict')
        ort_pred = self.backend_model(inputs, deepcopy(samples), mode='predict')
        vs_mmdet = match_detections(_detections(mmdet_ref[0]), _detections(ort_pred[0]),
                                    score_thr, max_per_img, self.score_atol, self.box_atol)
        result['detections_vs_mmdet'] = vs_mmdet
        self.log(f'[{key}] final detections, ONNX Runtime vs mmdet\'s own predict '
                 f'(reported): {_match_line(vs_mmdet, checked=False)}')
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


def _dets_labels(dets, labels) -> Dict[str, np.ndarray]:
    """Image 0 of mmdeploy's (dets, labels), without the zero-score rows that pad the output
    (mmdeploy's End2EndModel drops them the same way)."""
    dets = torch.as_tensor(dets).detach().cpu().double()[0]
    labels = torch.as_tensor(labels).detach().cpu()[0]
    keep = dets[:, 4] > 0
    dets, labels = dets[keep], labels[keep]
    return dict(bboxes=dets[:, :4].numpy().reshape(-1, 4), scores=dets[:, 4].numpy().reshape(-1),
                labels=labels.numpy().reshape(-1))


def _match_line(match: Dict[str, Any], checked: bool = True) -> str:
    """One report line; ``checked=False``: a comparison that is reported, not a criterion."""
    verdict = ('PASS' if match['ok'] else 'FAIL') if checked else (
        'same' if match['ok'] else 'differ (reported only)')
    return (f'{match["num_ort"]} vs {match["num_ref"]}, {match["matched"]} matched (same label, '
            f'max box diff {match["max_box_diff"]:.2e} px, max score diff '
            f'{match["max_score_diff"]:.2e}); unmatched {match["unmatched_ref"]}/'
            f'{match["unmatched_ort"]}, {match["unexplained"]} not at a score tie -> {verdict}')


# ------------------------------------------------------------------------------------------------
# Main entry
# ------------------------------------------------------------------------------------------------
def deploy_onnx(config: str,
                checkpoint: str,
                out_dir: str,
                *,
                deploy_cfg: Optional[str] = None,
                dynamic: bool = False,
                image: Optional[str] = None,
                shape: Optional[Sequence[int]] = None,
                verify: bool = False,
                evaluate: bool = False,
                cfg_options: Optional[dict] = None,
                atol: float = DEFAULT_ATOL,
                rtol: float = DEFAULT_RTOL,
                score_atol: float = DEFAULT_SCORE_ATOL,
                box_atol: float = DEFAULT_BOX_ATOL,
                runs: int = 5,
                log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Fold (if needed), export with mmdeploy, run in ONNX Runtime, compare; see module doc.

    Returns the report (also written to ``OUT_DIR/deploy_report.json``). Raises
    :class:`DeployError` (nothing written) for bad input and, with ``verify``,
    :class:`DeployVerificationError` when ONNX Runtime's outputs differ beyond tolerance.
    """
    versions = _require_deploy_stack()
    config, checkpoint, out_dir = os.fspath(config), os.fspath(checkpoint), os.fspath(out_dir)
    cfg = _load_cfg(config, 'CONFIG')
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if 'model' not in cfg:
        raise DeployError(f'CONFIG {config!r} has no "model"; pass a model config.')
    task = _task_of(cfg)
    if image is not None and not os.path.isfile(image):
        raise DeployError(f'--image {image!r} does not exist or is not a file; pass an image file '
                          f'or leave --image out (the test set\'s first image, else random).')
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DeployError(f'OUT_DIR {out_dir!r} is a file; pass a directory.')
    deploy_cfg_path = deploy_cfg or default_deploy_config(task, dynamic)
    dcfg = _load_deploy_cfg(deploy_cfg_path, task, shape)
    try:
        ckpt = load_checkpoint_file(checkpoint)
        kind = check_checkpoint_config(ckpt, cfg, checkpoint, os.path.basename(config))
    except CheckpointError as error:
        raise DeployError(str(error)) from None
    log(f'checkpoint: {kind}')
    report: Dict[str, Any] = dict(config=config, checkpoint=checkpoint, checkpoint_kind=kind,
                                  deploy_cfg=deploy_cfg_path, versions=versions,
                                  dynamic=_is_dynamic(dcfg), seconds={})
    from .mmdeploy_compat import SHIMS
    report['shims'] = [name for name, _ in SHIMS]

    parent = os.path.dirname(os.path.abspath(out_dir))
    try:
        os.makedirs(parent, exist_ok=True)
        stage = tempfile.mkdtemp(prefix='.deploy_onnx_', dir=parent)
    except OSError as error:
        raise DeployError(f'OUT_DIR {out_dir!r} cannot be written ({error.strerror}); choose a '
                          f'writable directory.') from None
    try:
        _run(cfg, config, checkpoint, ckpt, task, dcfg, stage, report, image, shape, verify,
             evaluate, cfg_options, atol, rtol, score_atol, box_atol, runs, log)
        with open(os.path.join(stage, REPORT), 'w') as f:
            json.dump(report, f, indent=2, default=_json_default)
        if report.get('verify_ok') is False and verify:
            raise DeployVerificationError(
                f'verify failed: ONNX Runtime outputs differ from PyTorch beyond tolerance '
                f'({report["verify_failures"]}); nothing was written. Check the deploy config '
                f'and the onnxruntime version, or loosen --rtol/--atol.', report)
        _check_inputs_kept(out_dir, os.listdir(stage),
                           [config, checkpoint, deploy_cfg_path, image])
        os.makedirs(out_dir, exist_ok=True)
        for name in sorted(os.listdir(stage)):
            os.replace(os.path.join(stage, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    report['out_dir'] = out_dir
    return report


def _check_inputs_kept(out_dir: str, names, inputs) -> None:
    """Inputs are never replaced: refuse where an output would land on one (e.g. an edited
    ``OUT_DIR/deploy_cfg.py`` passed back as --deploy-cfg)."""
    for name in names:
        target = os.path.join(out_dir, name)
        for source in inputs:
            if (source and os.path.exists(target) and os.path.exists(source)
                    and os.path.samefile(target, source)):
                raise DeployError(f'{target!r} would be replaced by this export but it is the '
                                  f'input {source!r}; nothing was written. Copy the input out of '
                                  f'OUT_DIR or pass another OUT_DIR.')


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.generic, )):
        return value.item()
    if isinstance(value, OutputDiff):
        return dict(name=value.name, shape=list(value.shape), max_ref=value.scale,
                    max_abs=value.max_abs, max_rel=value.max_rel, ok=value.ok)
    return str(value)


def _refuse_dynamic_same_padding(model: nn.Module) -> None:
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


def _run(cfg, config, checkpoint, ckpt, task, dcfg, stage, report, image, shape, verify,
         evaluate, cfg_options, atol, rtol, score_atol, box_atol, runs, log) -> None:
    from mmdeploy.apis import build_task_processor, torch2onnx
    from mmdeploy.apis.onnx import export as mmdeploy_export
    from mmdeploy.utils import get_input_shape
    from .deploy import FoldError, fold_checkpoint
    from .mmdeploy_compat import mmdeploy_export_compat

    seconds = report['seconds']
    stem = os.path.splitext(os.path.basename(config))[0]
    # 1. fold, or take the pair as it is (a folded checkpoint with its training config: the
    #    deploy config is made here, as the fold would have written it)
    meta = ckpt.get('meta') if isinstance(ckpt, dict) else None
    if config_has_doconv(cfg) and isinstance(meta, dict) and meta.get('doconv_folded'):
        from .deploy_config import make_deploy_config
        model_cfg = make_deploy_config(cfg)
        model_cfg_path = os.path.join(stage, f'{stem}_deploy.py')
        model_cfg.dump(model_cfg_path)
        model_cfg = Config.fromfile(model_cfg_path)
        weights = checkpoint
        log(f'{os.path.basename(checkpoint)} is already folded: exporting it with the deploy '
            f'config of {os.path.basename(config)} ({os.path.basename(model_cfg_path)})')
    elif config_has_doconv(cfg):
        folded = os.path.join(stage, os.path.splitext(os.path.basename(checkpoint))[0]
                              + '_folded.pth')
        model_cfg_path = os.path.join(stage, f'{stem}_deploy.py')
        start = time.perf_counter()
        try:
            result = fold_checkpoint(cfg, checkpoint, folded, out_config=model_cfg_path,
                                     verify=verify, log=log)
        except FoldError as error:
            raise DeployError(str(error)) from None
        seconds['fold'] = time.perf_counter() - start
        report['folded'] = dict(checkpoint=os.path.basename(folded),
                                deploy_config=os.path.basename(model_cfg_path),
                                num_folded=result.num_folded)
        if result.verify is not None:
            report['fold_verify'] = result.verify
        model_cfg = Config.fromfile(model_cfg_path)
        weights = folded
    else:
        model_cfg, weights = cfg, checkpoint
        model_cfg_path = config
    deploy_cfg_file = os.path.join(stage, 'deploy_cfg.py')
    dcfg.dump(deploy_cfg_file)

    # 2. the PyTorch model and the input (one image through the test pipeline)
    sdk_model_cfg = deepcopy(model_cfg)  # create_input edits the pipeline of model_cfg
    processor = build_task_processor(model_cfg, dcfg, 'cpu')
    torch_model = processor.build_pytorch_model(None)
    state = load_checkpoint_file(weights)
    state = state.get('state_dict', state)
    state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}
    try:
        torch_model.load_state_dict(state, strict=True)
    except RuntimeError:
        found = '; '.join(
            f'{what}: {key_listing(keys)}' for what, keys in zip(
                ('missing', 'unexpected', 'mis-shaped'), key_mismatch(torch_model.state_dict(),
                                                                      state)) if keys)
        raise DeployError(f'the checkpoint does not strict-load into the model of '
                          f'{os.path.basename(model_cfg_path)} ({found}); pass the config the '
                          f'checkpoint belongs to.') from None
    from .fold import count_doconv
    if count_doconv(torch_model):
        raise RuntimeError('the model to export still has DO-Conv layers')
    if report['dynamic']:
        _refuse_dynamic_same_padding(torch_model)
    if image is not None:
        img, image_desc = image, image
    else:
        img, image_desc = _default_image(model_cfg, shape, log)
    report['input'] = image_desc
    input_shape = get_input_shape(dcfg)
    data, inputs = processor.create_input(img, input_shape,
                                          data_preprocessor=torch_model.data_preprocessor)
    report['input_shape'] = list(inputs.shape)
    report['opset'] = int(dcfg.onnx_config.get('opset_version', 11))

    # 3. export: end-to-end (mmdeploy's torch2onnx) and the raw head outputs (mmdeploy's export)
    start = time.perf_counter()
    with mmdeploy_export_compat():
        torch2onnx(img if isinstance(img, str) else img.copy(), stage, END2END, dcfg, model_cfg,
                   weights, device='cpu')
    seconds['export_end2end'] = time.perf_counter() - start
    raw_module = RawHeadOutputs(torch_model, task).eval()
    with torch.no_grad():
        raw_module(inputs)  # records the output names
    names = [_onnx_name(n) for n in raw_module.names]
    dynamic_axes = None
    if report['dynamic']:
        dynamic_axes = {'input': {0: 'batch', 2: 'height', 3: 'width'}}
        dynamic_axes.update({n: {0: 'batch', 2: f'{n}_h', 3: f'{n}_w'} for n in names})
    onnx_cfg = dcfg.onnx_config
    start = time.perf_counter()
    with mmdeploy_export_compat():
        mmdeploy_export(raw_module, inputs, os.path.join(stage, os.path.splitext(RAW)[0]),
                        backend='onnxruntime', context_info=dict(deploy_cfg=dcfg),
                        input_names=['input'], output_names=names,
                        opset_version=onnx_cfg.get('opset_version', 11),
                        dynamic_axes=dynamic_axes,
                        keep_initializers_as_inputs=onnx_cfg.get('keep_initializers_as_inputs',
                                                                 False))
    seconds['export_raw'] = time.perf_counter() - start
    roi_module = None
    if task == 'det' and _two_stage(torch_model):
        roi_module = RoIHeadOutputs(torch_model).eval()
        with torch.no_grad():
            rois = _proposal_rois(torch_model, inputs, data['data_samples'])
        roi_axes = {'rois': {0: 'num_rois'}, 'cls_score': {0: 'num_rois'},
                    'bbox_pred': {0: 'num_rois'}}
        if report['dynamic']:
            roi_axes['input'] = {0: 'batch', 2: 'height', 3: 'width'}
        start = time.perf_counter()
        with mmdeploy_export_compat():
            mmdeploy_export(roi_module, (inputs, rois),
                            os.path.join(stage, os.path.splitext(ROI)[0]),
                            backend='onnxruntime', context_info=dict(deploy_cfg=dcfg),
                            input_names=['input', 'rois'],
                            output_names=['cls_score', 'bbox_pred'],
                            opset_version=onnx_cfg.get('opset_version', 11),
                            dynamic_axes=roi_axes,
                            keep_initializers_as_inputs=onnx_cfg.get(
                                'keep_initializers_as_inputs', False))
        seconds['export_roi'] = time.perf_counter() - start
    try:
        from mmdeploy.backend.sdk.export_info import export2SDK
        export2SDK(dcfg, sdk_model_cfg, stage, pth=weights, device='cpu')
        report['sdk_meta'] = ['deploy.json', 'pipeline.json', 'detail.json']
    except Exception as error:  # SDK meta is a convenience; the ONNX files are the product
        log(f'mmdeploy SDK meta not written ({type(error).__name__}: {first_line_or_type(error)})')

    # 4. graph checks
    report['ops'] = {}
    for name in (END2END, RAW) + ((ROI, ) if roi_module is not None else ()):
        path = os.path.join(stage, name)
        ops = onnx_ops(path)
        _check_ops(path, ops)
        report['ops'][name] = ops
    log(f'{END2END}: {sum(report["ops"][END2END].values())} nodes, standard ops only '
        f'({", ".join(report["ops"][END2END])})')

    # 5. ONNX Runtime vs PyTorch on the test pipeline's input (and, for dynamic-shape configs,
    #    on a second input of another shape)
    import onnxruntime as ort
    start = time.perf_counter()
    backend_model = processor.build_backend_model(
        [os.path.join(stage, END2END)],
        data_preprocessor_updater=processor.update_data_preprocessor)
    raw_session = ort.InferenceSession(os.path.join(stage, RAW),
                                       providers=['CPUExecutionProvider'])
    roi_session = None if roi_module is None else ort.InferenceSession(
        os.path.join(stage, ROI), providers=['CPUExecutionProvider'])
    seconds['ort_session'] = time.perf_counter() - start
    compare = _Comparer(task, torch_model, raw_module, names, raw_session, backend_model, dcfg,
                        atol, rtol, score_atol, box_atol, log, roi_module, roi_session)
    failures = compare(data, inputs, 'input')
    report['comparisons'] = {'input': compare.results['input']}
    if report['dynamic']:
        height, width = inputs.shape[2:]
        other = (max(32, int(height) * 3 // 4), int(width) * 5 // 4)
        rng = np.random.default_rng(1)
        img2 = rng.integers(0, 256, (*other, 3), dtype=np.uint8)
        data2, inputs2 = processor.create_input(img2, None,
                                                data_preprocessor=torch_model.data_preprocessor)
        log(f'dynamic shape: second input {tuple(inputs2.shape)} (random image {other[0]}x'
            f'{other[1]} through the test pipeline)')
        failures += compare(data2, inputs2, 'second_input')
        report['comparisons']['second_input'] = compare.results['second_input']
    samples = data['data_samples']
    with torch.no_grad():  # the preprocessed input: network + post-processing, per image
        seconds['ort_ms_per_image'] = _median_ms(
            lambda: backend_model(inputs, deepcopy(samples), mode='predict'), runs)
        seconds['torch_ms_per_image'] = _median_ms(
            lambda: torch_model(inputs, deepcopy(samples), mode='predict'), runs)
    report['verify_ok'] = not failures
    report['verify_failures'] = ', '.join(failures) or None
    log(f'per image, network + post-processing (median of {runs}): ONNX Runtime '
        f'{seconds["ort_ms_per_image"]:.1f} ms, PyTorch {seconds["torch_ms_per_image"]:.1f} ms')

    # 6. evaluation on the test set
    if evaluate:
        torch_metrics, torch_s = _evaluate(torch_model, model_cfg)
        ort_metrics, ort_s = _evaluate(backend_model, model_cfg)
        report['metrics'] = dict(pytorch=torch_metrics, onnxruntime=ort_metrics)
        seconds['eval_pytorch'], seconds['eval_onnxruntime'] = torch_s, ort_s
        for key in torch_metrics:
            log(f'{key}: PyTorch {torch_metrics[key]:.4f}, ONNX Runtime '
                f'{ort_metrics.get(key, math.nan):.4f}')
