"""DO-Conv with TensorFlow "SAME" padding: the DO-Conv twin of mmcv's ``Conv2dAdaptivePadding``.

mmdet's and mmpretrain's EfficientNet build their convs with ``conv_cfg=dict(type=
'Conv2dAdaptivePadding')``, and mmseg's MobileNetV3 uses that type for its stride-2 convs: the
input is zero-padded at call time so that the output has ceil(size / stride) pixels, with the odd
pixel of padding at the bottom / right. ``conv_cfg=dict(type='DOConv')`` there would pad
symmetrically instead, which shifts every stride-2 sampling grid by one pixel against the
pretrained weights. ``conv_cfg=dict(type='DOConvAdaptivePadding')`` keeps the padding rule:

    y = conv2d(pad_same(x), W', padding=self.padding)   W' composed as in DOConv2d (D = 0 -> W)

It folds into ``Conv2dAdaptivePadding`` (the deploy config names that type), and
:func:`do_conv_mm.convert_to_doconv` converts ``Conv2dAdaptivePadding`` modules into it.
"""
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn.bricks import Conv2dAdaptivePadding

from .doconv import DOConv2d, register_doconv_layer

__all__ = ['DOConv2dAdaptivePadding', 'same_padding']


def same_padding(size: List[int], kernel_size: List[int], stride: List[int],
                 dilation: List[int]) -> List[int]:
    """F.pad amounts [left, right, top, bottom] that make a conv's output ceil(size / stride)
    pixels per side (size = [h, w]; the odd pixel goes right / bottom), as mmcv's
    Conv2dAdaptivePadding computes them."""
    pads: List[int] = []
    for i in (1, 0):  # F.pad lists the last dimension (width) first
        out = (size[i] + stride[i] - 1) // stride[i]
        total = max((out - 1) * stride[i] + (kernel_size[i] - 1) * dilation[i] + 1 - size[i], 0)
        pads += [total // 2, total - total // 2]
    return pads


class DOConv2dAdaptivePadding(DOConv2d, nn.Conv2d):
    """:class:`DOConv2d` that pads its input like mmcv's ``Conv2dAdaptivePadding``.

    Same arguments as DOConv2d; ``padding`` is set to 0 as in Conv2dAdaptivePadding (the "SAME"
    padding replaces it) and ``padding_mode`` must stay 'zeros'. Input (N, C, H, W) or (C, H, W);
    output (N, O, ceil(H / sh), ceil(W / sw)).

    nn.Conv2d is named among the direct bases (the MRO is unchanged) because mmengine's
    ``init_cfg`` matches ``layer='Conv2d'`` against a module's class and its *direct* bases only:
    EfficientNet's default ``dict(type='Kaiming', layer='Conv2d')`` must reach this layer.
    """
    plain_class = Conv2dAdaptivePadding
    plain_layer_type = 'Conv2dAdaptivePadding'

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = 'zeros',
                 device=None, dtype=None, *, D_mul: Optional[int] = None):
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups,
                         bias, padding_mode, device, dtype, D_mul=D_mul)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        pads = same_padding([input.shape[-2], input.shape[-1]], list(self.kernel_size),
                            list(self.stride), list(self.dilation))
        if max(pads) > 0:
            input = F.pad(input, pads)
        return self._own_conv_forward(input)

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d,
                    D_mul: Optional[int] = None) -> 'DOConv2dAdaptivePadding':
        """The DO-Conv twin of a ``Conv2dAdaptivePadding`` (D = 0, weights shared)."""
        cls._check_plain_twin(conv)
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0,
                    conv.dilation, conv.groups, conv.bias is not None,
                    device=conv.weight.device, dtype=conv.weight.dtype, D_mul=D_mul)
        layer.padding = conv.padding  # 0 unless set after construction; applied after 'SAME'
        return layer._sharing_parameters_of(conv)

    def _empty_plain_conv(self) -> Conv2dAdaptivePadding:
        conv = Conv2dAdaptivePadding(self.in_channels, self.out_channels, self.kernel_size,
                                     self.stride, 0, self.dilation, self.groups,
                                     self.bias is not None)  # it takes no device / dtype
        conv.padding = self.padding
        return conv.to(device=self.weight.device, dtype=self.weight.dtype)


register_doconv_layer(DOConv2dAdaptivePadding, ('DOConvAdaptivePadding', 'DOConv2dAdaptivePadding'))
