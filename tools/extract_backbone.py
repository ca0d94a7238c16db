"""Extract the backbone of a classifier checkpoint (DO-Conv D included) for mmdet / mmseg.

    python tools/extract_backbone.py CHECKPOINT OUT.pth [--prefix backbone.] [--use-ema]
                                     [--config DET_OR_SEG_CONFIG] [--cfg-options K=V ...]

OUT gets ``{meta, state_dict}`` with the ``backbone.*`` weights of CHECKPOINT (an mmpretrain
training checkpoint) without the prefix; mmpretrain's deep-stem keys (ResNetV1c/V1d
``stem.N.conv`` / ``stem.N.bn``) are renamed to mmdet's / mmseg's (``stem.3N`` / ``stem.3N+1``).
Load it with ``init_cfg=dict(type='Pretrained', checkpoint='OUT.pth')`` (no prefix). For backbones
without a deep stem (ResNet, ResNeXt) this step is optional: ``init_cfg=dict(type='Pretrained',
checkpoint=CHECKPOINT, prefix='backbone.')`` loads the classifier checkpoint directly.

``--config``: check that OUT loads completely into that config's backbone (DO-Conv D and D_mul
included) before writing; a mismatch is one ``error:`` line naming the keys. OUT is written
atomically; on any error nothing is written.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a checkout

from do_conv_mm.runner_setup import CfgOptionsAction  # noqa: E402

from do_conv_mm.checkpoint import CheckpointError, load_checkpoint_file  # noqa: E402
from do_conv_mm.pretrained import (backbone_state_dict, build_config_module,  # noqa: E402
                                   check_pretrained_state_dict)
from do_conv_mm.version import __version__  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Extract the (DO-Conv) backbone of a classifier checkpoint for mmdet/mmseg')
    parser.add_argument('checkpoint', help='classifier checkpoint (.pth), keys backbone.*')
    parser.add_argument('out', help='output .pth (backbone weights, keys without the prefix)')
    parser.add_argument('--prefix', default='backbone.',
                        help='key prefix of the backbone in CHECKPOINT (default: backbone.)')
    parser.add_argument('--use-ema', action='store_true',
                        help='make sure the EMA weights are extracted (mmengine\'s EMAHook saves '
                        'them as state_dict, the default; refused without EMA)')
    parser.add_argument('--config', help='an mmdet / mmseg config whose model.backbone OUT must '
                        'load into completely (checked before writing)')
    parser.add_argument('--force', action='store_true',
                        help='replace an existing OUT that this tool did not write')
    parser.add_argument('--cfg-options', nargs='+', action=CfgOptionsAction,
                        help='override settings of --config, key=value')
    args = parser.parse_args(argv)
    if args.cfg_options and not args.config:
        parser.error('--cfg-options applies to --config; pass --config too')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from do_conv_mm.deploy import FoldError, check_checkpoint_output, save_atomically
    from do_conv_mm.runner_setup import ToolError
    try:
        # OUT: not an input, in a writable directory, not a file this tool did not write
        check_checkpoint_output(args.out, [args.checkpoint, args.config], 'extracted_from',
                                args.force)
        checkpoint = load_checkpoint_file(args.checkpoint)
        state_dict, renamed = backbone_state_dict(checkpoint, args.prefix, args.use_ema)
        n_doconv = sum(k.endswith('.D') for k in state_dict)
        summary = None
        if args.config:
            backbone = build_config_module(args.config, args.cfg_options, 'backbone')
            summary = check_pretrained_state_dict(
                backbone, state_dict, repr(args.checkpoint),
                f'the backbone of {osp.basename(args.config)}')
        meta = dict(extracted_from=osp.abspath(args.checkpoint), prefix=args.prefix,
                    weights=('state_dict (EMA weights)' if 'ema_state_dict' in checkpoint
                             else 'state_dict'),
                    doconv_layers=n_doconv, stem_keys_renamed=renamed,
                    do_conv_mm_version=__version__)
        save_atomically(dict(meta=meta, state_dict=state_dict), args.out)
    except (CheckpointError, ToolError, FoldError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 1
    print(f'{args.out}: {len(state_dict)} backbone tensors, D of {n_doconv} DO-Conv layer(s)'
          + (f', {renamed} deep-stem keys renamed' if renamed else '') + '.')
    if summary:
        print(f'loads completely into the backbone of {args.config}: {summary}.')
    print(f"use: model.backbone.init_cfg = dict(type='Pretrained', checkpoint='{args.out}')")
    return 0


if __name__ == '__main__':
    sys.exit(main())
