"""Check that a folded (deploy) model computes what its DO-Conv original computes.

Both models see the same preprocessed batch in eval mode, and every output tensor is compared:

* detectors: ``extract_feat`` (backbone/neck features), then for two-stage detectors the RPN
  head's raw maps and the RoI head's ``forward`` on the *same* proposals (the reference model's,
  so tiny score differences cannot reorder proposals and make rows incomparable); for the others
  the head outputs of ``model(inputs, data_samples, mode='tensor')``;
* segmentors: ``extract_feat``, ``model(inputs, mode='tensor')`` (decode head logits) and the
  auxiliary head(s);
* classifiers (mmpretrain): ``extract_feat`` (backbone/neck features) and
  ``model(inputs, mode='tensor')`` (the head's logits, before softmax);
* anything else: ``model(inputs, data_samples, mode='tensor')``.

Tolerance (fp32). An output passes when ``max|deploy - ref| <= atol + rtol * max|ref|``; the
reported relative difference is ``max|deploy - ref| / max|ref|`` (relative to the output's
scale, because element-wise ratios are meaningless where outputs cross zero). Folding composes
each kernel in float64 and rounds it once to fp32 (relative error <= 6e-8 per entry), while the
unfolded DO-Conv model composes in fp32; the two then convolve with kernels that differ in the last
bits and accumulate in different orders, and such differences grow with depth through BN and
ReLU. Measured on all ten shipped R50 configs (Faster/Mask/Cascade R-CNN, RetinaNet, FCOS, FCN,
PSPNet, DeepLabV3(+), UPerNet) with random D ~ N(0, 0.1) and random BN statistics, the worst
scale-relative difference per model is 5.9e-7 .. 2.4e-6, and 1.2e-5 for FCOS's smallest
centerness map. The default ``rtol=1e-4`` leaves a margin of 8x over the worst case (40x over
the typical one) and is still ~1000x below what a wrong fold produces (a dropped or mis-indexed D
changes outputs by O(|D|), ~1e-1 relative for D ~ 0.1).
"""
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ['OutputDiff', 'DEFAULT_ATOL', 'DEFAULT_RTOL', 'make_verify_batch', 'model_outputs',
           'compare_outputs', 'format_diffs', 'model_task']

DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-5  # only matters for outputs whose scale is ~0 (e.g. an all-zero feature map)


@dataclass
class OutputDiff:
    """How far one deploy-model output is from the DO-Conv model's (``ok`` within tolerance)."""
    name: str
    shape: Tuple[int, ...]
    scale: float  # max |reference output|
    max_abs: float
    max_rel: float  # max_abs / scale
    ok: bool


# ------------------------------------------------------------------------------------------------
# Input
# ------------------------------------------------------------------------------------------------
def model_task(model: nn.Module) -> str:
    """'det', 'seg', 'cls' (mmpretrain classifier) or 'other', from the model's class hierarchy."""
    names = {c.__name__ for c in type(model).__mro__}
    if 'BaseDetector' in names:
        return 'det'
    if 'BaseSegmentor' in names:
        return 'seg'
    if 'BaseClassifier' in names:
        return 'cls'
    return 'other'


def _random_sample(task: str, height: int, width: int):
    """A data sample with the metainfo the test-mode heads read (None for other tasks)."""
    meta = dict(img_shape=(height, width), ori_shape=(height, width), pad_shape=(height, width))
    if task == 'det':
        from mmdet.structures import DetDataSample
        return DetDataSample(metainfo=dict(meta, scale_factor=(1.0, 1.0), img_id=0))
    if task == 'seg':
        from mmseg.structures import SegDataSample
        return SegDataSample(metainfo=meta)
    if task == 'cls':
        from mmpretrain.structures import DataSample
        return DataSample(metainfo=dict(img_shape=(height, width), ori_shape=(height, width)))
    return None


def _test_pipeline(cfg) -> List[dict]:
    """The config's test pipeline without annotation loading (there are no labels to load)."""
    pipeline = None
    loader = cfg.get('test_dataloader')
    if loader is not None:
        dataset = loader.get('dataset', {})
        while 'pipeline' not in dataset and 'dataset' in dataset:  # dataset wrappers
            dataset = dataset['dataset']
        pipeline = dataset.get('pipeline')
    pipeline = pipeline or cfg.get('test_pipeline')
    if not pipeline:
        raise ValueError('the config has neither test_dataloader.dataset.pipeline nor '
                         'test_pipeline; verify without --image (random input) instead.')
    return [dict(t) for t in pipeline if not str(t.get('type', '')).endswith('LoadAnnotations')]


def make_verify_batch(model: nn.Module,
                      cfg,
                      image: Optional[str] = None,
                      size: Sequence[int] = (128, 128),
                      seed: int = 0) -> Dict[str, Any]:
    """A preprocessed test batch of one image: ``dict(inputs=(1, 3, H, W), data_samples=...)``.

    ``image``: a file run through the config's test pipeline; otherwise a seeded random uint8
    image of ``size`` (H, W). Either way ``model.data_preprocessor`` normalises and pads it.
    Call inside the config's default scope (the pipeline's transforms are looked up there).
    """
    from mmengine.dataset import Compose, pseudo_collate
    if image is not None:
        data = Compose(_test_pipeline(cfg))(dict(img_path=image, img_id=0))
        batch = pseudo_collate([data])
    else:
        height, width = (int(v) for v in size)
        generator = torch.Generator().manual_seed(seed)
        img = torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8)
        sample = _random_sample(model_task(model), height, width)
        batch = dict(inputs=[img], data_samples=None if sample is None else [sample])
    with torch.no_grad():
        return model.data_preprocessor(batch, False)


# ------------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------------
def _flatten(obj: Any, name: str, out: Dict[str, torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        out[name] = obj.detach()
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            _flatten(item, f'{name}[{i}]', out)
    elif isinstance(obj, dict):
        for key, item in obj.items():
            _flatten(item, f'{name}.{key}', out)


@torch.no_grad()
def model_outputs(model: nn.Module, batch: Dict[str, Any], proposals=None):
    """Every raw output tensor of ``model`` on ``batch``, by name; and the proposals used.

    ``proposals`` (two-stage detectors): RPN results to feed the RoI head; None computes them
    from this model (pass the reference model's to the deploy model).
    """
    model.eval()
    inputs, samples = batch['inputs'], batch.get('data_samples')
    out: Dict[str, torch.Tensor] = {}
    task = model_task(model)
    if task in ('det', 'seg', 'cls'):
        _flatten(model.extract_feat(inputs), 'feat', out)
    if task == 'det' and getattr(model, 'with_rpn', False) and hasattr(model, 'roi_head'):
        feats = model.extract_feat(inputs)
        _flatten(model.rpn_head(feats), 'rpn_head', out)
        if proposals is None:
            proposals = model.rpn_head.predict(feats, samples, rescale=False)
        _flatten(model.roi_head.forward(feats, proposals, samples), 'roi_head', out)
    else:
        name = {'det': 'head', 'seg': 'decode_head', 'cls': 'head'}.get(task, 'tensor')
        _flatten(model(inputs, samples, mode='tensor'), name, out)
    if task == 'seg' and getattr(model, 'with_auxiliary_head', False):
        feats = model.extract_feat(inputs)
        heads = model.auxiliary_head
        heads = heads if isinstance(heads, nn.ModuleList) else [heads]
        for i, head in enumerate(heads):
            _flatten(head.forward(feats), f'auxiliary_head[{i}]', out)
    return out, proposals


def compare_outputs(reference: Dict[str, torch.Tensor],
                    deployed: Dict[str, torch.Tensor],
                    atol: float = DEFAULT_ATOL,
                    rtol: float = DEFAULT_RTOL) -> List[OutputDiff]:
    """Per-output differences (see the module docstring for the criterion)."""
    if list(reference) != list(deployed):
        raise ValueError(f'the deploy model returns outputs {list(deployed)[:6]}..., the DO-Conv '
                         f'model {list(reference)[:6]}...; they are not the same architecture.')
    diffs = []
    for name, ref in reference.items():
        dep = deployed[name]
        if ref.shape != dep.shape:
            diffs.append(OutputDiff(name, tuple(ref.shape), math.nan, math.inf, math.inf, False))
            continue
        ref64, dep64 = ref.double(), dep.double()
        finite = torch.isfinite(ref64)
        same_nonfinite = bool(torch.equal(finite, torch.isfinite(dep64)))
        scale = float(ref64[finite].abs().max()) if finite.any() else 0.0
        max_abs = float((ref64 - dep64)[finite].abs().max()) if finite.any() else 0.0
        max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
        ok = same_nonfinite and max_abs <= atol + rtol * scale
        diffs.append(OutputDiff(name, tuple(ref.shape), scale, max_abs, max_rel, ok))
    return diffs


def format_diffs(diffs: List[OutputDiff], atol: float, rtol: float) -> str:
    """A table, one line per output, and a verdict line."""
    width = max([len(d.name) for d in diffs] + [6])
    lines = [f'{"output":<{width}}  {"shape":<20} {"max|ref|":>10} {"max abs":>10} '
             f'{"max rel":>10}']
    for d in diffs:
        shape = 'x'.join(str(s) for s in d.shape)
        lines.append(f'{d.name:<{width}}  {shape:<20} {d.scale:10.3e} {d.max_abs:10.3e} '
                     f'{d.max_rel:10.3e}{"" if d.ok else "  FAIL"}')
    worst_abs = max(diffs, key=lambda d: d.max_abs)
    worst_rel = max(diffs, key=lambda d: d.max_rel)
    failed = sum(not d.ok for d in diffs)
    verdict = 'PASS' if not failed else f'FAIL ({failed} of {len(diffs)} outputs)'
    lines.append(f'verify {verdict}: {len(diffs)} outputs, worst max abs {worst_abs.max_abs:.3e} '
                 f'({worst_abs.name}), worst max rel {worst_rel.max_rel:.3e} ({worst_rel.name}); '
                 f'tolerance max abs <= {atol:g} + {rtol:g} * max|ref|')
    return '\n'.join(lines)
