"""Make model tools that look layer types up *exactly* treat DOConv2d as the conv it is.

These tools keep tables keyed by ``type(module)``, so a subclass of nn.Conv2d is invisible to
them; their tables are their only extension point, and this module adds DOConv2d to them (new
keys only: nothing that stock code sees for stock types changes). Every step is idempotent and
skips quietly where the tool or its table is absent.

* mmcv's FLOP counter (``mmcv.cnn.get_model_complexity_info``): DOConv2d counts as the conv it
  deploys to (its composition is training-time work that folds away).
* torch's eager-mode fuser (``torch.ao.quantization.fuse_modules``): every fusion pattern that
  starts with nn.Conv2d also starts with DOConv2d; the DOConv2d is folded to its plain Conv2d
  first (quantised models are deployed models), then fused as torch fuses a Conv2d.
* torch's eager-mode quantisation (``prepare`` / ``convert``, ``prepare_qat``, ``quantize``):
  where those swap an nn.Conv2d for torch's quantised or QAT conv, they swap a DOConv2d for the
  same module made from its fold. Post-training quantisation thus gives int8 convs of W', and
  QAT trains W' itself (D is folded in; FX's ``prepare_qat_fx`` keeps D training instead).
* mmengine's efficient_conv_bn_eval (the Runner's ``efficient_conv_bn_eval=[...]`` option) finds
  conv + BN pairs in a torch.fx trace, which runs into a DOConv2d (it is no torch.nn module)
  and met its functional conv2d, looked up as a module: KeyError. Its trace keeps DOConv2d
  whole (a leaf), so a pair runs as ``conv._conv_forward(x, BN-scaled weight, bias)``, which a
  DOConv2d composes (weight_extra scaled along). Tracing is the stock one for every other type.
"""
import functools
import inspect

import torch.nn as nn

from .doconv import DOConv2d

__all__ = ['register_model_tools']


def _register_mmcv_flops_counter() -> None:
    try:
        from mmcv.cnn.utils import flops_counter
    except ImportError:
        return
    stock = getattr(flops_counter, 'get_modules_mapping', None)
    if stock is None or getattr(stock, 'includes_doconv', False):
        return

    @functools.wraps(stock)
    def get_modules_mapping():
        mapping = stock()
        mapping[DOConv2d] = mapping[nn.Conv2d]
        return mapping

    get_modules_mapping.includes_doconv = True
    flops_counter.get_modules_mapping = get_modules_mapping


def _fold_first(fuser):
    """A fuser method for (DOConv2d, ...) from torch's method for (nn.Conv2d, ...)."""

    def fuse(is_qat, conv, *others):
        plain = conv.to_conv2d()  # it runs conv's hooks, as the conv a stock fuser gets
        fused = fuser(is_qat, plain, *others)
        # torch's fuse_known_modules moves conv's pre-hooks onto the fused module: the fold's
        # copies must not run a second time from inside it
        for table in ('_forward_pre_hooks', '_forward_pre_hooks_with_kwargs'):
            if table in plain.__dict__:
                plain.__dict__[table].clear()
        return fused

    return fuse


def _register_torch_fusers() -> None:
    try:
        from torch.ao.quantization import fuser_method_mappings
    except ImportError:
        return
    table = getattr(fuser_method_mappings, '_DEFAULT_OP_LIST_TO_FUSER_METHOD', None)
    if not isinstance(table, dict):
        return
    for pattern, fuser in list(table.items()):
        if isinstance(pattern, tuple) and pattern[0] is nn.Conv2d:
            table.setdefault((DOConv2d, ) + pattern[1:], _fold_first(fuser))


def _fold_then(target: type) -> type:
    """A swap target for torch's eager quantisation tables: ``from_float`` folds the DOConv2d
    into its plain Conv2d, moves over the qconfig and the output observer that ``prepare``
    attached, and hands that conv to ``target.from_float`` (torch's module for nn.Conv2d)."""
    passes_fake_quant_flag = 'use_precomputed_fake_quant' in inspect.signature(
        target.from_float).parameters

    class FoldedDOConv2d:
        __doc__ = f'DOConv2d -> its fold -> {target.__module__}.{target.__name__}.'

        @classmethod
        def from_float(cls, mod: DOConv2d, use_precomputed_fake_quant: bool = False):
            conv = mod.to_conv2d()
            conv.qconfig = mod.qconfig
            if hasattr(mod, 'activation_post_process'):
                conv.activation_post_process = mod.activation_post_process
            if passes_fake_quant_flag:
                return target.from_float(
                    conv, use_precomputed_fake_quant=use_precomputed_fake_quant)
            return target.from_float(conv)

    return FoldedDOConv2d


def _register_torch_eager_quantisation() -> None:
    try:
        from torch.ao.nn import qat, quantized
        from torch.ao.quantization import quantization_mappings
    except ImportError:
        return
    for table_name, target in (('DEFAULT_STATIC_QUANT_MODULE_MAPPINGS', quantized.Conv2d),
                               ('DEFAULT_QAT_MODULE_MAPPINGS', qat.Conv2d)):
        table = getattr(quantization_mappings, table_name, None)
        if isinstance(table, dict) and DOConv2d not in table:
            table[DOConv2d] = _fold_then(target)


def _register_mmengine_efficient_conv_bn_eval() -> None:
    try:
        from mmengine.model import efficient_conv_bn_eval as tool
    except ImportError:
        return
    stock = getattr(tool, 'turn_on_efficient_conv_bn_eval_for_single_model', None)
    transform = getattr(tool, 'efficient_conv_bn_eval_graph_transform', None)
    if stock is None or transform is None or getattr(stock, 'includes_doconv', False):
        return

    import torch.fx as fx

    class DOConvLeafTracer(fx.Tracer):
        def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
            return type(module) is DOConv2d or super().is_leaf_module(module, qualified_name)

    @functools.wraps(stock)
    def turn_on_efficient_conv_bn_eval_for_single_model(model: nn.Module) -> None:
        tracer = DOConvLeafTracer()
        graph = tracer.trace(model)
        fx_model = fx.GraphModule(tracer.root, graph, type(model).__name__)
        transform(fx_model)
        model.forward = fx_model.forward

    turn_on_efficient_conv_bn_eval_for_single_model.includes_doconv = True
    tool.turn_on_efficient_conv_bn_eval_for_single_model = (
        turn_on_efficient_conv_bn_eval_for_single_model)


def register_model_tools() -> None:
    """Add DOConv2d to mmcv's FLOP counter, torch's eager-mode fuser and quantisation tables,
    and mmengine's efficient_conv_bn_eval."""
    _register_mmcv_flops_counter()
    _register_torch_fusers()
    _register_torch_eager_quantisation()
    _register_mmengine_efficient_conv_bn_eval()
