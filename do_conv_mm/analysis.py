"""DO-Conv coverage of a model: which k×k convs are DO-Conv, their FLOP share, extra parameters.

FLOPs are multiply-accumulates of convolutions only, counted by forward hooks on one dummy
forward pass (batch of one image):

* conv (incl. DOConv2d, deformable):  out.numel() · (in_ch / groups) · kh · kw
  (= out_h · out_w · out_ch · in_ch/groups · kh · kw per image, summed over RoIs in RoI heads);
* transposed conv: in.numel() · (out_ch / groups) · kh · kw.

"k×k" means kh·kw > 1; 1×1 convs are outside the share (a 1×1 DO-Conv is a plain conv). The cost
of composing DO-Conv kernels is not counted (it does not depend on the input size).

What trained D does (:func:`kernel_changes`, for a model holding checkpoint weights): per DO-Conv
k×k layer, how far D moves the kernel the layer deploys from its plain kernel,

    change = ‖W' − weight‖_F / ‖weight‖_F      (float64; 0 exactly when D = 0)

and the RMS of D; a layer whose D is still exactly 0 computes the plain conv (never trained:
frozen, or its D got no updates).
"""
import statistics
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from .composition import compose_kernel
from .convert import _doconv_class_for, _is_conv_like, _why_not_convertible
from .doconv import DOConv2d

__all__ = ['ComponentCoverage', 'KernelChange', 'conv_flops_by_module', 'doconv_coverage',
           'kernel_changes', 'summarise_kernel_changes']


@dataclass
class ComponentCoverage:
    """Coverage of one top-level component (``backbone``, ``neck``, ``rpn_head``, ...)."""
    doconv_kxk: int = 0
    frozen_doconv_kxk: int = 0  # DOConv k×k whose D does not train (e.g. ResNet frozen_stages)
    doconv_1x1: int = 0
    plain_kxk: List[str] = field(default_factory=list)
    conv_flops: int = 0  # all convs, 1×1 included
    kxk_flops: int = 0
    doconv_kxk_flops: int = 0
    trainable_doconv_kxk_flops: int = 0
    extra_params: int = 0
    params: int = 0

    @property
    def doconv_flop_share(self) -> Optional[float]:
        return self.doconv_kxk_flops / self.kxk_flops if self.kxk_flops else None

    @property
    def trainable_doconv_flop_share(self) -> Optional[float]:
        return self.trainable_doconv_kxk_flops / self.kxk_flops if self.kxk_flops else None

    def add(self, other: 'ComponentCoverage') -> None:
        self.doconv_kxk += other.doconv_kxk
        self.frozen_doconv_kxk += other.frozen_doconv_kxk
        self.doconv_1x1 += other.doconv_1x1
        self.plain_kxk += other.plain_kxk
        self.conv_flops += other.conv_flops
        self.kxk_flops += other.kxk_flops
        self.doconv_kxk_flops += other.doconv_kxk_flops
        self.trainable_doconv_kxk_flops += other.trainable_doconv_kxk_flops
        self.extra_params += other.extra_params
        self.params += other.params

    def to_dict(self) -> Dict:
        return dict(doconv_kxk=self.doconv_kxk, frozen_doconv_kxk=self.frozen_doconv_kxk,
                    doconv_1x1=self.doconv_1x1, plain_kxk=list(self.plain_kxk),
                    conv_flops=self.conv_flops, kxk_flops=self.kxk_flops,
                    doconv_kxk_flops=self.doconv_kxk_flops,
                    trainable_doconv_kxk_flops=self.trainable_doconv_kxk_flops,
                    doconv_flop_share=self.doconv_flop_share,
                    trainable_doconv_flop_share=self.trainable_doconv_flop_share,
                    extra_params=self.extra_params, params=self.params)


def _kernel_taps(module: nn.Module) -> int:
    return int(module.weight.shape[2] * module.weight.shape[3])


def _conv_flops(module: nn.Module, inputs, output) -> int:
    per_position = int(module.weight.shape[1]) * _kernel_taps(module)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return inputs[0].numel() * per_position
    return output.numel() * per_position


def conv_flops_by_module(model: nn.Module, run: Callable[[], object]) -> Dict[str, int]:
    """Call ``run()`` once with hooks on every conv-like module of ``model``; return
    {module name: conv MACs in that call} for every 2-D conv-like module (0 when not called)."""
    flops: Dict[str, int] = OrderedDict()
    handles = []
    for name, module in model.named_modules():
        weight = getattr(module, 'weight', None)
        if not (_is_conv_like(module) and isinstance(weight, torch.Tensor) and weight.dim() == 4):
            continue
        flops[name] = 0

        def hook(mod, inputs, output, name=name):
            flops[name] += _conv_flops(mod, inputs, output)

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return flops


def _component(name: str) -> str:
    return name.split('.', 1)[0] if name else '<root>'


def _plain_reason(module: nn.Module) -> str:
    reason = _why_not_convertible(module)
    if reason is not None:
        return reason
    doconv_class = _doconv_class_for(module)
    if doconv_class is DOConv2d:
        return 'plain nn.Conv2d: convertible with DOConvModel include'
    return (f'mmcv {type(module).__name__}: convertible with DOConvModel include (it becomes '
            f'{doconv_class.__name__}, which computes the same at D = 0)')


def doconv_coverage(model: nn.Module, flops: Dict[str, int]) -> Dict:
    """Per-component and total coverage of ``model`` given ``conv_flops_by_module`` output.

    Returns ``{'components': {name: ComponentCoverage}, 'total': ComponentCoverage,
    'plain_reasons': {conv name: why it is plain}, 'not_run': [...]}``. ``params`` counts the
    model's parameters without the DO-Conv extras (the plain model's size).
    """
    components: Dict[str, ComponentCoverage] = OrderedDict()
    plain_reasons: Dict[str, str] = OrderedDict()
    for name, module in model.named_modules():
        if name in flops:
            cov = components.setdefault(_component(name), ComponentCoverage())
            is_kxk = _kernel_taps(module) > 1
            cov.conv_flops += flops[name]
            if isinstance(module, DOConv2d):
                if module.D is None:
                    cov.doconv_1x1 += 1
                else:
                    cov.doconv_kxk += 1
                    cov.doconv_kxk_flops += flops[name]
                    if module.D.requires_grad:
                        cov.trainable_doconv_kxk_flops += flops[name]
                    else:
                        cov.frozen_doconv_kxk += 1
            elif is_kxk:
                cov.plain_kxk.append(name)
                plain_reasons[name] = _plain_reason(module)
            if is_kxk:
                cov.kxk_flops += flops[name]
    for name, param in model.named_parameters():
        cov = components.setdefault(_component(name.rpartition('.')[0]), ComponentCoverage())
        owner = model.get_submodule(name.rpartition('.')[0]) if '.' in name else model
        if isinstance(owner, DOConv2d) and name.rpartition('.')[2] in ('D', 'weight_extra'):
            cov.extra_params += param.numel()
        else:
            cov.params += param.numel()
    total = ComponentCoverage()
    for cov in components.values():
        total.add(cov)
    not_run = [name for name, value in flops.items() if value == 0]
    return dict(components=components, total=total, plain_reasons=plain_reasons,
                not_run=not_run)


@dataclass
class KernelChange:
    """What D does to one DO-Conv k×k layer: ``change`` = ‖W' − weight‖_F / ‖weight‖_F (None
    where weight is all zero), ``d_rms`` the RMS of D, ``trainable`` whether D trains."""
    name: str
    change: Optional[float]
    d_rms: float
    trainable: bool

    @property
    def untrained(self) -> bool:
        """D exactly 0: the layer computes its plain conv."""
        return self.d_rms == 0.0


def kernel_changes(model: nn.Module) -> List[KernelChange]:
    """:class:`KernelChange` of every DO-Conv k×k layer of ``model``, in module order (a layer
    registered under several names once, under its first: ``named_modules`` yields it once)."""
    changes = []
    for name, module in model.named_modules():
        if not isinstance(module, DOConv2d) or module.D is None:
            continue
        with torch.no_grad():
            weight, D = module.weight.double(), module.D.double()
            extra = None if module.weight_extra is None else module.weight_extra.double()
            delta = torch.linalg.vector_norm(compose_kernel(weight, D, extra, module.groups)
                                             - weight).item()
            norm = torch.linalg.vector_norm(weight).item()
            d_rms = torch.linalg.vector_norm(D).item() / D.numel() ** 0.5
        changes.append(KernelChange(name, delta / norm if norm > 0 else None, d_rms,
                                    module.D.requires_grad))
    return changes


def summarise_kernel_changes(changes: List[KernelChange]) -> Dict[str, Dict]:
    """Per component and ``total``: layers, ``untrained`` (D = 0) and how many of those have a
    trainable D, median and largest change and the layer with the largest one."""
    groups: Dict[str, List[KernelChange]] = OrderedDict()
    for change in changes:
        groups.setdefault(_component(change.name), []).append(change)
    groups['total'] = list(changes)
    summary = OrderedDict()
    for component, members in groups.items():
        measured = [c for c in members if c.change is not None]
        largest = max(measured, key=lambda c: c.change, default=None)
        untrained = [c for c in members if c.untrained]
        summary[component] = dict(
            layers=len(members), untrained=len(untrained),
            untrained_trainable=sum(c.trainable for c in untrained),
            median_change=statistics.median(c.change for c in measured) if measured else None,
            max_change=None if largest is None else largest.change,
            max_change_layer=None if largest is None else largest.name)
    return summary
