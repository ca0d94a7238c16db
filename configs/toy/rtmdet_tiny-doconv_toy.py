# DO-Conv twin of rtmdet_tiny_toy.py: identical recipe, DO-Conv in every k×k conv. conv_cfg reaches
# the backbone, neck and head convs that take it; CSPNeXt's stem and the 3×3 conv1 of every
# CSPNeXtBlock (backbone and neck) are built without conv_cfg, so DOConvModel converts them by
# name. The head's stacked convs are shared across the 3 levels (share_conv=True): each is one
# DOConv2d registered under 3 names, and it folds into one plain conv. rtm_cls / rtm_reg are 1×1
# convs and stay plain (a 1×1 DO-Conv is a 1×1 conv).
_base_ = './rtmdet_tiny_toy.py'

custom_imports = dict(imports=['do_conv_mm'], allow_failed_imports=False)
conv_cfg = dict(type='DOConv')
model = dict(
    type='DOConvModel',
    model_type='RTMDet',
    doconv=dict(include=['backbone.stem', '*.blocks.*.conv1']),
    backbone=dict(conv_cfg=conv_cfg),
    neck=dict(conv_cfg=conv_cfg),
    bbox_head=dict(conv_cfg=conv_cfg))
