"""DO-Conv with weight standardisation: the DO-Conv twin of mmcv's ``ConvWS`` (``ConvWS2d``).

mmdet's GN+WS recipes (``configs/gn+ws``) build every conv with ``conv_cfg=dict(type='ConvWS')``:
the kernel is standardised per output channel before each convolution. ``conv_cfg=dict(type=
'DOConv')`` there would drop the standardisation (and its pretrained weights, trained with it,
would no longer fit). ``conv_cfg=dict(type='DOConvWS')`` keeps it, on the composed kernel:

    y = conv_ws_2d(x, W')    W' composed as in DOConv2d (D = 0 -> W); mmcv's own conv_ws_2d

It folds into ``ConvWS`` holding W' (standardised at run time, as in training); the deploy
config names that type, and :func:`do_conv_mm.convert_to_doconv` converts ``ConvWS2d`` modules.
The conv always runs as the plain differentiable expression (compose, standardise, convolve):
the standardisation sits between composition and convolution, where the memory-light training
Function of DOConv2d has no room for it.
"""
from typing import Optional

import torch
import torch.nn as nn
from mmcv.cnn.bricks.conv_ws import ConvWS2d, conv_ws_2d

from .composition import compose_kernel, no_autocast
from .doconv import DOConv2d, register_doconv_layer

__all__ = ['DOConv2dWS']


class DOConv2dWS(DOConv2d, nn.Conv2d):
    """:class:`DOConv2d` whose composed kernel is weight-standardised as mmcv's ``ConvWS2d`` does.

    Same arguments as DOConv2d plus keyword-only ``eps`` (ConvWS's, default 1e-5);
    ``padding_mode`` must stay 'zeros' (ConvWS pads with zeros). nn.Conv2d is named among the
    direct bases for mmengine's ``init_cfg`` ``layer='Conv2d'`` matching (see
    :class:`DOConv2dAdaptivePadding`). ``composed_weight()`` is W' before standardisation.
    """
    plain_class = ConvWS2d
    plain_layer_type = 'ConvWS'

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = 'zeros',
                 device=None, dtype=None, *, D_mul: Optional[int] = None, eps: float = 1e-5):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device, dtype, D_mul=D_mul)
        self.eps = eps

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor]) -> torch.Tensor:
        """conv_ws_2d(input, W') with W' composed from ``weight`` (normally ``self.weight``)."""
        if self.D is not None:
            with no_autocast(weight.device.type):
                weight = compose_kernel(weight, self.D, self.weight_extra, self.groups)
        return conv_ws_2d(input, weight, bias, self.stride, self.padding, self.dilation,
                          self.groups, self.eps)

    def extra_repr(self) -> str:
        return super().extra_repr() + f', eps={self.eps}'

    @classmethod
    def _twin_arguments(cls, conv: ConvWS2d) -> dict:
        """from_conv2d of an mmcv ``ConvWS2d`` keeps its eps."""
        return dict(eps=conv.eps)

    def _empty_plain_conv(self) -> ConvWS2d:
        conv = ConvWS2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                        self.padding, self.dilation, self.groups, self.bias is not None,
                        eps=self.eps)  # it takes no device / dtype
        return conv.to(device=self.weight.device, dtype=self.weight.dtype)


register_doconv_layer(DOConv2dWS, ('DOConvWS', 'DOConv2dWS'))
