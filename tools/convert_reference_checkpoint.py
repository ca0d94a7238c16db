"""Convert a checkpoint trained with the public reference DO-Conv code to do_conv_mm's layout.

    python tools/convert_reference_checkpoint.py CHECKPOINT OUT.pth [--plain]
        [--config CONFIG [--part backbone] [--cfg-options K=V ...]]

Each reference layer (``<name>.W`` (O, Cg, D_mul), ``.D``, ``.d_diag``) becomes a DOConv2d's
``<name>.weight`` / ``.D`` / ``.weight_extra``; every other weight is kept as it is (a
``module.`` wrapper prefix is dropped). Layers with groups = 1 (and plain depthwise ones) convert
exactly; other grouped layers are rebased (the reference ties their D to other input channels):
their composed kernel becomes ``weight`` and D restarts at 0, the same function. ``--plain``
writes every layer's composed kernel only, for a model with plain convs.
See do_conv_mm/reference_checkpoint.py.

OUT gets ``{meta, state_dict}``; load it with ``init_cfg=dict(type='Pretrained', checkpoint=OUT)``
on the part it was trained as (e.g. a torchvision-style ResNet into mmdet's / mmseg's ResNet
backbone: the key names are the same). ``--config``: read non-square kernel shapes from that
config's model and check, before writing, that OUT loads completely into its ``--part``
(default ``backbone``; ``''`` for the whole model), D_mul included. OUT is written atomically;
on any error nothing is written and the tool prints one ``error:`` line.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a checkout

from do_conv_mm.runner_setup import CfgOptionsAction  # noqa: E402

from do_conv_mm.checkpoint import CheckpointError, key_listing, load_checkpoint_file  # noqa: E402
from do_conv_mm.version import __version__  # noqa: E402


# ReferenceLayer.how -> what the summary line calls it, in the order it lists them.
HOW = {'exact': 'exactly (D kept)', 'rebased': 'rebased (D restarts at 0, same function)',
       'folded': 'folded to plain kernels', '1x1': '1×1 (plain)'}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Convert a reference DO-Conv checkpoint (W, D, d_diag) to do_conv_mm')
    parser.add_argument('checkpoint', help='checkpoint saved from a model built with the '
                        'reference DOConv2d (a state dict, or a dict with "state_dict"/"model")')
    parser.add_argument('out', help='output .pth ({meta, state_dict} in do_conv_mm\'s layout)')
    parser.add_argument('--plain', action='store_true',
                        help='fold every layer to its composed kernel: weights for plain convs')
    parser.add_argument('--config', help='an mmdet / mmseg / mmpretrain config whose --part OUT '
                        'must load into completely (checked before writing)')
    parser.add_argument('--part', default=None,
                        help="the part of --config's model OUT is for (default: backbone; '' "
                        'for the whole model)')
    parser.add_argument('--force', action='store_true',
                        help='replace an existing OUT that this tool did not write')
    parser.add_argument('--cfg-options', nargs='+', action=CfgOptionsAction,
                        help='override settings of --config, key=value')
    args = parser.parse_args(argv)
    if not args.config and (args.part is not None or args.cfg_options):
        parser.error('--part and --cfg-options apply to --config; pass --config too')
    if args.part is None:
        args.part = 'backbone'
    return args


def reference_weights(checkpoint: dict) -> dict:
    """The weights of a reference training checkpoint: ``state_dict``, ``model`` (what many
    training scripts save) or the dict itself."""
    from do_conv_mm.pretrained import checkpoint_state_dict
    if 'state_dict' not in checkpoint and isinstance(checkpoint.get('model'), dict):
        return checkpoint['model']
    return checkpoint_state_dict(checkpoint)


def kernel_sizes_of(module) -> dict:
    """{layer name: (kh, kw)} of every conv of ``module``."""
    import torch.nn as nn
    return {name: tuple(m.kernel_size) for name, m in module.named_modules()
            if isinstance(m, nn.Conv2d)}  # DOConv2d included


def conv_cfg_hint(layers) -> str:
    """The conv_cfg the converted layers were trained with (D_mul defaults to kh*kw)."""
    extra = {layer.D_mul for layer in layers if layer.groups is not None
             and layer.D_mul != layer.kernel_size[0] * layer.kernel_size[1]}
    if not extra:
        return "conv_cfg=dict(type='DOConv')"
    if len(extra) == 1:
        return f"conv_cfg=dict(type='DOConv', D_mul={extra.pop()})"
    return f'DO-Conv layers with D_mul {sorted(extra)} (as trained)'


def main(argv=None) -> int:
    args = parse_args(argv)
    from do_conv_mm.deploy import FoldError, check_checkpoint_output, save_atomically
    from do_conv_mm.pretrained import build_config_module, check_pretrained_state_dict
    from do_conv_mm.reference_checkpoint import convert_reference_state_dict
    from do_conv_mm.runner_setup import ToolError
    try:
        # OUT: not an input, in a writable directory, not a file this tool did not write
        check_checkpoint_output(args.out, [args.checkpoint, args.config], 'converted_from',
                                args.force)
        weights = reference_weights(load_checkpoint_file(args.checkpoint))
        target = kernel_sizes = None
        if args.config:
            target = build_config_module(args.config, args.cfg_options, args.part)
            kernel_sizes = kernel_sizes_of(target)
        state_dict, layers = convert_reference_state_dict(weights, kernel_sizes, args.plain)
        summary = None
        if target is not None:
            where = (f'the {args.part} of ' if args.part else 'the model of ') + \
                osp.basename(args.config)
            summary = check_pretrained_state_dict(target, state_dict,
                                                  f'{args.checkpoint!r} converted', where)
        by_how = {how: [layer.name for layer in layers if layer.how == how] for how in HOW}
        meta = dict(converted_from=osp.abspath(args.checkpoint), reference_layers=len(layers),
                    rebased_layers=by_how['rebased'], folded=args.plain,
                    do_conv_mm_version=__version__)
        save_atomically(dict(meta=meta, state_dict=state_dict), args.out)
    except (CheckpointError, ToolError, FoldError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 1
    counts = ', '.join(f'{len(by_how[how])} {what}' for how, what in HOW.items() if by_how[how])
    print(f'{args.out}: {len(layers)} reference DO-Conv layer(s) converted: {counts}.')
    if by_how['rebased']:
        print(f'rebased: {key_listing(by_how["rebased"])} (the reference ties these grouped '
              f'layers\' D to other input channels than the ones they read).')
    if any(layer.diag_rebuilt for layer in layers):
        print('note: some layers had no d_diag in the checkpoint; rebuilt by the reference\'s '
              'rule (eye(kh*kw) repeated, zero-padded to D_mul).')
    if summary:
        print(f'loads completely into {where}: {summary}.')
    built_with = 'plain convs (or DO-Conv, starting at D = 0)' if args.plain else \
        conv_cfg_hint(layers)
    print(f"use: init_cfg=dict(type='Pretrained', checkpoint='{args.out}') on the part it was "
          f"trained as, built with {built_with}.")
    return 0


if __name__ == '__main__':
    sys.exit(main())
