"""Prototype for the lead: DO-Conv's training-path composition without strided adds.

``do_conv_mm.doconv._ComposedConv2d`` (saves only its inputs, recomposes W' in backward) spends
most of its composition time in ``weight + delta`` and ``grad_kernel + grad_W`` where one operand
is a 3-D-permuted view (an elementwise kernel over a strided operand; torch.profiler attributes
~60% of the overhead in bench/results/profile_step.md to aten::add). This prototype keeps the
same Function structure and memory behaviour but composes in the (C, K, O) layout: the input
side is a free strided view (``weight.reshape(O, C·K).t()``) that BLAS reads directly, the "+ W"
is fused into ``baddbmm``, and the only copies are 2-D transposes (groups == 1, D_mul == kh*kw).

``python bench/compose_prototype.py`` times one training step (conv forward + backward) of a single
layer, plain vs package DOConv2d vs prototype, interleaved, and checks the prototype's outputs and
gradients against the package layer. Writes bench/results/compose_prototype.md.
"""
from bench_utils import add_common_args, command_line, environment_lines, md_table, median_iqr, \
    paired_ratios, setup_run, write_markdown, \
    interleaved_times  # first: sets OMP_WAIT_POLICY before torch loads OpenMP

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.autograd.function import once_differentiable  # noqa: E402

from do_conv_mm import DOConv2d  # noqa: E402


def compose_ckO(weight, D):
    """W' (O, C, kh, kw) via the (C, K, O) layout: one baddbmm + one 2-D transpose copy."""
    O, C, kh, kw = weight.shape
    K = kh * kw
    Wt = weight.reshape(O, C * K).t().view(C, K, O)  # free view
    return torch.baddbmm(Wt, D, Wt).view(C * K, O).t().contiguous().view(O, C, kh, kw)


def compose_ckO_backward(grad_kernel, weight, D):
    """(dL/dweight, dL/dD) given dL/dW'; two 2-D transposes, one bmm, one baddbmm."""
    O, C, kh, kw = weight.shape
    K = kh * kw
    Wt = weight.reshape(O, C * K).t().view(C, K, O)
    g = grad_kernel.reshape(O, C * K).t().contiguous().view(C, K, O)
    grad_D = torch.bmm(g, Wt.transpose(1, 2))
    grad_W = torch.baddbmm(g, D.transpose(1, 2), g).view(C * K, O).t().contiguous()
    return grad_W.view(O, C, kh, kw), grad_D


class ComposedConv2dProto(torch.autograd.Function):
    """Same contract as do_conv_mm.doconv._ComposedConv2d (groups == 1, no weight_extra)."""

    @staticmethod
    def forward(ctx, x, weight, D, bias, stride, padding, dilation):
        ctx.save_for_backward(x, weight, D)
        ctx.conv_args = (stride, padding, dilation)
        ctx.bias_shape = None if bias is None else list(bias.shape)
        return F.conv2d(x, compose_ckO(weight, D), bias, stride, padding, dilation)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, D = ctx.saved_tensors
        stride, padding, dilation = ctx.conv_args
        kernel = compose_ckO(weight, D)
        grad_x, grad_kernel, grad_bias = torch.ops.aten.convolution_backward(
            grad_out, x, kernel, ctx.bias_shape, stride, padding, dilation, False, [0, 0], 1,
            [ctx.needs_input_grad[0], True, ctx.needs_input_grad[3]])
        grad_weight, grad_D = compose_ckO_backward(grad_kernel, weight, D)
        return grad_x, grad_weight, grad_D, grad_bias, None, None, None


class DOConv2dProto(DOConv2d):
    """DOConv2d whose training path uses the prototype Function."""

    def _conv_forward(self, input, weight, bias):
        if (self.D is not None and weight is self.weight and self.groups == 1
                and self.weight_extra is None and torch.is_grad_enabled()
                and self.padding_mode == 'zeros' and not isinstance(self.padding, str)):
            return ComposedConv2dProto.apply(input, self.weight, self.D, bias, self.stride,
                                             self.padding, self.dilation)
        return super()._conv_forward(input, weight, bias)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--shapes', nargs='+', default=['512x512x16', '256x256x32', '128x128x64'],
                        help='CinxCoutxHW of a 3x3 layer and its input side (batch 2)')
    parser.add_argument('--reps', type=int, default=15)
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.reps = 5
    device = setup_run(args)
    rows, checks = [], []
    for spec in args.shapes:
        cin, cout, hw = map(int, spec.split('x'))
        torch.manual_seed(0)
        plain = nn.Conv2d(cin, cout, 3, padding=1, bias=False).to(device)
        layers = {'plain': plain}
        for name, cls in (('DOConv2d (package)', DOConv2d), ('prototype', DOConv2dProto)):
            layer = cls(cin, cout, 3, padding=1, bias=False).to(device)
            layer.load_state_dict(plain.state_dict())
            with torch.no_grad():
                gen = torch.Generator().manual_seed(1)
                layer.D.copy_(torch.randn(layer.D.shape, generator=gen) * 0.01)
            layers[name] = layer
        x = torch.randn(2, cin, hw, hw, device=device, requires_grad=True)
        g = torch.randn(2, cout, hw, hw, device=device)

        def step(layer):
            def run():
                layer.zero_grad(set_to_none=True)
                x.grad = None
                layer(x).backward(g)
            return run
        wall, _ = interleaved_times({k: step(m) for k, m in layers.items()}, args.reps, 2, device,
                                    progress=False)
        ratios = paired_ratios(wall, 'plain')
        for k in layers:
            med, iqr = median_iqr(wall[k])
            rmed, riqr = median_iqr(ratios[k])
            rows.append([spec, k, f'{med * 1e3:.2f} ({iqr * 1e3:.2f})',
                         f'{rmed:.3f} ({riqr:.3f})',
                         f'{(med - median_iqr(wall["plain"])[0]) * 1e3:+.2f}'])
        ref, new = layers['DOConv2d (package)'], layers['prototype']
        outs = []
        for layer in (ref, new):
            layer.zero_grad(set_to_none=True)
            x.grad = None
            y = layer(x)
            y.backward(g)
            outs.append((y.detach(), layer.weight.grad.clone(), layer.D.grad.clone(),
                         x.grad.clone()))
        diffs = [((a - b).abs().max() / a.abs().max()).item() for a, b in zip(*outs)]
        checks.append(f'- {spec}: max relative difference prototype vs package (output, '
                      f'dweight, dD, dx): ' + ', '.join(f'{d:.1e}' for d in diffs))
    sections = [
        'One 3×3 layer, training step (forward + backward, batch 2), plain Conv2d vs the '
        'package DOConv2d (training path `_ComposedConv2d`) vs the prototype in this file, '
        'interleaved, median (IQR) over repetitions.',
        '## Setup\n\n' + '\n'.join([f'- Command: {command_line(sys.argv)}']
                                   + environment_lines(args, device)),
        '## Step time\n\n' + md_table(['layer CinxCoutxHW', 'variant', 'ms/step (IQR)',
                                       'ratio vs plain (IQR)', 'extra ms'], rows),
        '## Exactness (float32)\n\n' + '\n'.join(checks),
    ]
    write_markdown(os.path.join(args.out_dir, 'compose_prototype.md'),
                   'Prototype: composition without strided adds', sections)


if __name__ == '__main__':
    main()
