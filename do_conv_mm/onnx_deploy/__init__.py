"""Export a DO-Conv model through mmdeploy to ONNX and check it in ONNX Runtime.

The API of ``tools/deploy_onnx.py`` (runs where the ``deploy`` extra is installed: mmdeploy 1.3.1,
onnxruntime, onnx; see README, Deployment). :func:`deploy_onnx`:

1. loads the checkpoint safely and refuses train/deploy mix-ups
   (:mod:`do_conv_mm.checkpoint_guard`);
2. folds a DO-Conv training checkpoint first (:func:`do_conv_mm.fold_checkpoint`, which also
   writes the deploy config), or takes an already folded / plain checkpoint with its deploy /
   plain config as it is; the weights must strict-load into the deploy model;
3. exports with mmdeploy (``torch2onnx``, under
   :func:`do_conv_mm.mmdeploy_compat.mmdeploy_export_compat`) to ``end2end.onnx``
   (detections or segmentation output, mmdeploy's post-processing included) and, through
   mmdeploy's ``export`` with the same deploy config, ``raw_outputs.onnx``: the dense head's
   raw maps (``bbox_head``/``rpn_head``/``decode_head`` forward on the features);
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

The steps live in their own modules: :mod:`.onnx_configs` (configs), :mod:`.onnx_export` (the
staged export run), :mod:`.head_outputs` (exported head modules), :mod:`.onnx_checks` (graph
checks), :mod:`.onnx_compare` / :mod:`.detection_match` (comparisons), :mod:`.onnx_measure`
(timing, evaluation).
"""
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np

from ..checkpoint import CheckpointError, load_checkpoint_file
from ..checkpoint_guard import check_checkpoint_config
from ..deploy.output_checks import same_file
from ..deploy_verify import DEFAULT_ATOL, DEFAULT_RTOL, OutputDiff
from .detection_match import DEFAULT_BOX_ATOL, DEFAULT_SCORE_ATOL, match_detections
from .onnx_checks import onnx_ops
from .onnx_configs import (DEPLOY_CONFIG_DIR, default_deploy_config, is_dynamic, load_cfg_file,
                           load_deploy_cfg, task_of)
from .onnx_errors import DeployError, DeployVerificationError
from .onnx_export import run_export

__all__ = ['DeployError', 'DeployVerificationError', 'deploy_onnx', 'default_deploy_config',
           'DEPLOY_CONFIG_DIR', 'DEFAULT_SCORE_ATOL', 'DEFAULT_BOX_ATOL', 'onnx_ops',
           'match_detections']

REPORT = 'deploy_report.json'


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
    cfg = load_cfg_file(config, 'CONFIG')
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if 'model' not in cfg:
        raise DeployError(f'CONFIG {config!r} has no "model"; pass a model config.')
    task = task_of(cfg)
    if image is not None and not os.path.isfile(image):
        raise DeployError(f'--image {image!r} does not exist or is not a file; pass an image file '
                          f'or leave --image out (the test set\'s first image, else random).')
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DeployError(f'OUT_DIR {out_dir!r} is a file; pass a directory.')
    deploy_cfg_path = deploy_cfg or default_deploy_config(task, dynamic)
    dcfg = load_deploy_cfg(deploy_cfg_path, task, shape)
    try:
        ckpt = load_checkpoint_file(checkpoint)
        kind = check_checkpoint_config(ckpt, cfg, checkpoint, os.path.basename(config))
    except CheckpointError as error:
        raise DeployError(str(error)) from None
    log(f'checkpoint: {kind}')
    report: Dict[str, Any] = dict(config=config, checkpoint=checkpoint, checkpoint_kind=kind,
                                  deploy_cfg=deploy_cfg_path, versions=versions,
                                  dynamic=is_dynamic(dcfg), seconds={})
    from ..mmdeploy_compat import SHIMS
    report['shims'] = [name for name, _ in SHIMS]

    parent = os.path.dirname(os.path.abspath(out_dir))
    try:
        os.makedirs(parent, exist_ok=True)
        stage = tempfile.mkdtemp(prefix='.deploy_onnx_', dir=parent)
    except OSError as error:
        raise DeployError(f'OUT_DIR {out_dir!r} cannot be written ({error.strerror}); choose a '
                          f'writable directory.') from None
    try:
        run_export(cfg, config, checkpoint, ckpt, task, dcfg, stage, report, image, shape,
                   verify, evaluate, cfg_options, atol, rtol, score_atol, box_atol, runs, log)
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
            if source and os.path.exists(target) and same_file(target, source):
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
