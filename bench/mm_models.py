"""Model-zoo detectors/segmentors as plain / DO-Conv twins, with synthetic batches.

Models come from the configs packaged with mmdet / mmseg (``mmengine.hub.get_config``), changed
only where a single CPU process needs it (SyncBN -> BN) and so that nothing is downloaded
(pretrained ``init_cfg`` dropped; ``init_weights`` is never called: random weights time the same).
The DO-Conv twin is the same config plus ``conv_cfg=dict(type='DOConv')`` on every component that
honours it (see ``DOCONV_COMPONENTS``); it is warm-started from the plain twin's state dict and
then given small random D, so both twins hold the same weights and composition does real work.
"""
import copy
from typing import Dict, List

import torch
import torch.nn as nn

import do_conv_mm

# name -> (package/scope, model-zoo config, components that take conv_cfg)
MODEL_ZOO = {
    'faster_rcnn': ('mmdet', 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py',
                    # RPNHead takes no conv_cfg; Shared2FCBBoxHead has no convs.
                    ('backbone', 'neck')),
    'pspnet': ('mmseg', 'mmseg::pspnet/pspnet_r50-d8_4xb4-80k_ade20k-512x512.py',
               ('backbone', 'decode_head', 'auxiliary_head')),
    # Faster R-CNN without its RoI head: mmdet's RPN detector on the same backbone, neck and
    # RPN head (RPN losses). Its training step calls no compiled mmcv op (no RoIAlign; NMS only
    # at test time), so it runs where mmcv has no CUDA ops.
    'faster_rcnn_rpn': ('mmdet', 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py',
                        ('backbone', 'neck')),
}
DOCONV_COMPONENTS = {name: comps for name, (_, _, comps) in MODEL_ZOO.items()}
TITLES = {'faster_rcnn': 'Faster R-CNN R50-FPN', 'pspnet': 'PSPNet R50-D8',
          'faster_rcnn_rpn': 'Faster R-CNN R50-FPN without RoI head (backbone + neck + RPN head)'}


def _check_name(name: str) -> None:
    if name not in MODEL_ZOO:
        raise ValueError(f'unknown model {name!r}; choose from {sorted(MODEL_ZOO)}.')


def _bn_everywhere(cfg) -> None:
    """Replace SyncBN by BN in every norm_cfg (one process, no process group)."""
    if isinstance(cfg, dict):
        for key, value in cfg.items():
            if key == 'norm_cfg' and isinstance(value, dict) and value.get('type') == 'SyncBN':
                value['type'] = 'BN'
            else:
                _bn_everywhere(value)
    elif isinstance(cfg, (list, tuple)):
        for item in cfg:
            _bn_everywhere(item)


def model_cfg(name: str, doconv: bool, size: int = None):
    """The model config of ``name`` (a ConfigDict), with DO-Conv on its components if asked.

    ``size``: for segmentors, the data preprocessor pads to ``size``×``size`` instead of the
    recipe's crop (512×512), so a smaller synthetic batch is really smaller; None keeps it.
    """
    from mmengine.hub import get_config
    _check_name(name)
    _, zoo_cfg, components = MODEL_ZOO[name]
    cfg = copy.deepcopy(get_config(zoo_cfg).model)
    _bn_everywhere(cfg)
    cfg.pop('pretrained', None)
    cfg.backbone.init_cfg = None
    if size is not None and MODEL_ZOO[name][0] == 'mmseg':
        cfg.data_preprocessor.size = (size, size)
    if name == 'faster_rcnn_rpn':
        cfg.type = 'RPN'  # reads train_cfg.rpn and test_cfg.rpn; the rcnn parts go unused
        cfg.pop('roi_head')
    if doconv:
        for comp in components:
            cfg[comp].conv_cfg = dict(type='DOConv')
    return cfg


def _registry(name: str):
    scope = MODEL_ZOO[name][0]
    if scope == 'mmdet':
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
    else:
        from mmseg.registry import MODELS
        from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    return scope, MODELS


def build_model(name: str, doconv: bool, device='cpu', seed: int = 0,
                size: int = None) -> nn.Module:
    """Build one variant (random weights drawn from ``seed``) on ``device``, in train mode
    (``size``: see :func:`model_cfg`)."""
    from mmengine.registry import DefaultScope
    scope, models = _registry(name)
    torch.manual_seed(seed)
    with DefaultScope.overwrite_default_scope(scope):
        model = models.build(model_cfg(name, doconv, size))
    model.to(device)
    model.train()
    return model


@torch.no_grad()
def randomize_D(model: nn.Module, std: float = 0.01, seed: int = 0) -> int:
    """Fill every DO-Conv D with N(0, std²) draws (a trained-like, non-identity D; 0 resets).

    Returns the number of DO-Conv layers with a D (1×1 layers have none).
    """
    gen = torch.Generator().manual_seed(seed)
    n = 0
    for m in model.modules():
        if isinstance(m, do_conv_mm.DOConv2d) and m.D is not None:
            m.D.copy_(torch.randn(m.D.shape, generator=gen) * std)
            n += 1
    return n


def build_twins(name: str, device='cpu', seed: int = 0, d_std: float = 0.01,
                size: int = None) -> Dict[str, nn.Module]:
    """{'plain': model, 'doconv': model} with identical weights; DO-Conv D ~ N(0, d_std²)."""
    plain = build_model(name, False, device, seed, size)
    doconv = build_model(name, True, device, seed + 1, size)
    doconv.load_state_dict(plain.state_dict())  # strict: a plain state dict loads with D = 0
    if d_std:
        randomize_D(doconv, d_std, seed)
    return {'plain': plain, 'doconv': doconv}


def doconv_layers(model: nn.Module) -> List[nn.Module]:
    """DOConv2d layers of ``model`` that carry a D (k×k, k > 1)."""
    return [m for m in model.modules() if isinstance(m, do_conv_mm.DOConv2d) and m.D is not None]


def synthetic_batch(name: str, batch: int = 2, size: int = 512, seed: int = 0) -> dict:
    """A ``{'inputs', 'data_samples'}`` batch as the model-zoo dataloader would yield it.

    inputs: ``batch`` uint8 images (3, size, size). Detection samples carry 8 random boxes
    (corners inside the image, sides >= 16 px) and labels in [0, 80); segmentation samples a
    random (1, size, size) label map in [0, 150).
    """
    _check_name(name)
    gen = torch.Generator().manual_seed(seed)
    inputs = [torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=gen)
              for _ in range(batch)]
    meta = dict(img_shape=(size, size), ori_shape=(size, size), pad_shape=(size, size),
                scale_factor=(1.0, 1.0), flip=False, flip_direction=None)
    samples = []
    for i in range(batch):
        if MODEL_ZOO[name][0] == 'mmdet':
            from mmdet.structures import DetDataSample
            from mmengine.structures import InstanceData
            n = 8
            xy = torch.rand(n, 2, generator=gen) * (size - 16)
            wh = 16 + torch.rand(n, 2, generator=gen) * (size - 16 - xy)
            sample = DetDataSample(metainfo=dict(meta, img_id=i, img_path=f'synthetic_{i}.jpg'))
            sample.gt_instances = InstanceData(
                bboxes=torch.cat([xy, xy + wh], 1),
                labels=torch.randint(0, 80, (n,), generator=gen))
        else:
            from mmengine.structures import PixelData
            from mmseg.structures import SegDataSample
            sample = SegDataSample(metainfo=dict(meta, img_path=f'synthetic_{i}.jpg'))
            sample.gt_sem_seg = PixelData(
                data=torch.randint(0, 150, (1, size, size), generator=gen))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def recipe_cudnn_benchmark(name: str) -> bool:
    """The model-zoo recipe's ``env_cfg.cudnn_benchmark`` (mmseg recipes: True; mmdet: False)."""
    from mmengine.hub import get_config
    _check_name(name)
    env_cfg = get_config(MODEL_ZOO[name][1]).get('env_cfg', None) or {}
    return bool(env_cfg.get('cudnn_benchmark', False))


def optim_wrapper(model: nn.Module, amp: bool = False, lr: float = 0.0025):
    """mmengine OptimWrapper around SGD(momentum 0.9, wd 1e-4); with ``amp``: AmpOptimWrapper
    (fp16 autocast + dynamic loss scaling) on CUDA, do_conv_mm's BF16AmpOptimWrapper (bf16
    autocast) for a model on the CPU, where AmpOptimWrapper cannot run.

    lr 0.0025 is the model-zoo 0.02 scaled linearly from 16 to 2 images per batch.
    """
    from mmengine.optim import build_optim_wrapper
    wrapper = 'OptimWrapper'
    if amp:
        on_cpu = next(model.parameters()).device.type == 'cpu'
        wrapper = 'BF16AmpOptimWrapper' if on_cpu else 'AmpOptimWrapper'
    return build_optim_wrapper(model, dict(
        type=wrapper,
        optimizer=dict(type='SGD', lr=lr, momentum=0.9, weight_decay=1e-4)))


def train_step_fn(model: nn.Module, data: dict, wrapper, seed: int = 0):
    """A closure running one training step: preprocess, forward, loss, backward, SGD step.

    The RNG is reseeded before every step so the twins' random samplers draw alike.
    """
    def step():
        torch.manual_seed(seed)
        model.train_step(data, wrapper)
    return step


def detector_ops(device) -> (bool, str):
    """Can Faster R-CNN's compiled mmcv ops (RoIAlign forward/backward, NMS) run on ``device``?

    Returns ``(usable, description)``: a tiny RoIAlign forward + backward and an NMS are run
    through ``mmcv.ops``; the description names what served them (mmcv's compiled ops, or the
    bench shim's backend when mmcv-lite + bench/mmcv_ext_shim.py stands in) or why they failed.
    The shim's pure-PyTorch reference counts as unusable on CUDA (correct but far too slow to
    time a detector with).
    """
    device = torch.device(device)
    try:
        import mmcv
        from mmcv.ops import RoIAlign, nms
        x = torch.randn(1, 4, 16, 16, device=device, requires_grad=True)
        rois = torch.tensor([[0.0, 1.0, 1.5, 9.0, 12.0]], device=device)
        RoIAlign((2, 2), 1.0, 0, aligned=True)(x, rois).sum().backward()
        boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], device=device)
        _, keep = nms(boxes, torch.tensor([0.9, 0.8, 0.7], device=device), 0.5)
        if keep.tolist() != [0, 2] or x.grad is None:
            return False, f'mmcv.ops gave wrong results on {device.type}'
        ext = mmcv._ext
        if getattr(ext, 'DO_CONV_MM_SHIM', False):
            served = ext.backend_summary()
            if device.type == 'cuda' and 'torchvision' not in served:
                return False, f'mmcv-lite + bench shim, but only its slow reference ({served})'
            return True, (f'the bench shim on mmcv-lite {mmcv.__version__} (no compiled ops; '
                          f'served by {served})')
        from mmcv.ops import get_compiling_cuda_version
        return True, f'mmcv {mmcv.__version__} compiled ops (CUDA {get_compiling_cuda_version()})'
    except Exception as err:  # noqa: BLE001 - any failure: not usable, say why
        return False, f'{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ""}'
