"""One export, staged in a directory: fold (or take the pair as it is), build the PyTorch model
and its input, export ``end2end.onnx`` / ``raw_outputs.onnx`` (/ ``roi_outputs.onnx``) with
mmdeploy, check the graphs, compare ONNX Runtime with PyTorch, optionally evaluate; everything
found goes into ``report``.
"""
import math
import os
import time
from copy import deepcopy
from typing import Any, Optional, Sequence, Tuple

import numpy as np
import torch
from mmengine.config import Config

from ..checkpoint import key_listing, key_mismatch, load_checkpoint_file
from ..checkpoint_guard import config_has_doconv
from ..config_loading import first_line_or_type
from .head_outputs import RawHeadOutputs, RoIHeadOutputs, onnx_name, proposal_rois, two_stage
from .onnx_checks import check_ops, onnx_ops, refuse_dynamic_same_padding
from .onnx_compare import OnnxRuntimeComparer
from .onnx_errors import DeployError
from .onnx_measure import evaluate_on_test_set, median_ms

__all__ = ['END2END', 'RAW', 'ROI', 'run_export']

END2END = 'end2end.onnx'
RAW = 'raw_outputs.onnx'
ROI = 'roi_outputs.onnx'


def _default_image(cfg: Config, shape: Optional[Sequence[int]], log) -> Tuple[Any, str]:
    """The test set's first image when its files exist, else a seeded random image."""
    from mmengine.registry import DATASETS, DefaultScope
    from ..toy_data import ensure_toy_data_for_config
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


def run_export(cfg, config, checkpoint, ckpt, task, dcfg, stage, report, image, shape, verify,
               evaluate, cfg_options, atol, rtol, score_atol, box_atol, runs, log) -> None:
    """The export of :func:`.onnx_deploy.deploy_onnx`, steps 2-6 of its doc, written into
    ``stage``; ``report`` gets every result (DeployError for a checkpoint that does not fit)."""
    from mmdeploy.apis import build_task_processor, torch2onnx
    from mmdeploy.apis.onnx import export as mmdeploy_export
    from mmdeploy.utils import get_input_shape
    from ..deploy import FoldError, fold_checkpoint
    from ..mmdeploy_compat import mmdeploy_export_compat

    seconds = report['seconds']
    stem = os.path.splitext(os.path.basename(config))[0]
    # 1. fold, or take the pair as it is (a folded checkpoint with its training config: the
    #    deploy config is made here, as the fold would have written it)
    meta = ckpt.get('meta') if isinstance(ckpt, dict) else None
    if config_has_doconv(cfg) and isinstance(meta, dict) and meta.get('doconv_folded'):
        from ..deploy_config import make_deploy_config
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
    from ..fold import count_doconv
    if count_doconv(torch_model):
        raise RuntimeError('the model to export still has DO-Conv layers')
    if report['dynamic']:
        refuse_dynamic_same_padding(torch_model)
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
    names = [onnx_name(n) for n in raw_module.names]
    dynamic_axes = None
    if report['dynamic']:
        dynamic_axes = {'input': {0: 'batch', 2: 'height', 3: 'width'}}
        dynamic_axes.update({n: {0: 'batch', 2: f'{n}_h', 3: f'{n}_w'} for n in names})
    onnx_cfg = dcfg.onnx_config

    def export_module(module, args, name, input_names, output_names, axes):
        """mmdeploy's export of a head-output module to ``stage/name``, the deploy config's
        opset and initializer setting."""
        with mmdeploy_export_compat():
            mmdeploy_export(module, args, os.path.join(stage, os.path.splitext(name)[0]),
                            backend='onnxruntime', context_info=dict(deploy_cfg=dcfg),
                            input_names=input_names, output_names=output_names,
                            opset_version=onnx_cfg.get('opset_version', 11), dynamic_axes=axes,
                            keep_initializers_as_inputs=onnx_cfg.get(
                                'keep_initializers_as_inputs', False))

    start = time.perf_counter()
    export_module(raw_module, inputs, RAW, ['input'], names, dynamic_axes)
    seconds['export_raw'] = time.perf_counter() - start
    roi_module = None
    if task == 'det' and two_stage(torch_model):
        roi_module = RoIHeadOutputs(torch_model).eval()
        with torch.no_grad():
            rois = proposal_rois(torch_model, inputs, data['data_samples'])
        roi_axes = {'rois': {0: 'num_rois'}, 'cls_score': {0: 'num_rois'},
                    'bbox_pred': {0: 'num_rois'}}
        if report['dynamic']:
            roi_axes['input'] = {0: 'batch', 2: 'height', 3: 'width'}
        start = time.perf_counter()
        export_module(roi_module, (inputs, rois), ROI, ['input', 'rois'],
                      ['cls_score', 'bbox_pred'], roi_axes)
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
        check_ops(path, ops)
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
    compare = OnnxRuntimeComparer(task, torch_model, raw_module, names, raw_session,
                                  backend_model, dcfg, atol, rtol, score_atol, box_atol, log,
                                  roi_module, roi_session)
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
        seconds['ort_ms_per_image'] = median_ms(
            lambda: backend_model(inputs, deepcopy(samples), mode='predict'), runs)
        seconds['torch_ms_per_image'] = median_ms(
            lambda: torch_model(inputs, deepcopy(samples), mode='predict'), runs)
    report['verify_ok'] = not failures
    report['verify_failures'] = ', '.join(failures) or None
    log(f'per image, network + post-processing (median of {runs}): ONNX Runtime '
        f'{seconds["ort_ms_per_image"]:.1f} ms, PyTorch {seconds["torch_ms_per_image"]:.1f} ms')

    # 6. evaluation on the test set
    if evaluate:
        torch_metrics, torch_s = evaluate_on_test_set(torch_model, model_cfg)
        ort_metrics, ort_s = evaluate_on_test_set(backend_model, model_cfg)
        report['metrics'] = dict(pytorch=torch_metrics, onnxruntime=ort_metrics)
        seconds['eval_pytorch'], seconds['eval_onnxruntime'] = torch_s, ort_s
        for key in torch_metrics:
            log(f'{key}: PyTorch {torch_metrics[key]:.4f}, ONNX Runtime '
                f'{ort_metrics.get(key, math.nan):.4f}')
