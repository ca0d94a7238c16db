# RTMDet-tiny 300e COCO with DO-Conv: every k×k conv of backbone, neck and head (32). conv_cfg
# reaches 21 of them; CSPNeXt's stem and every CSPNeXtBlock's 3×3 conv1 (backbone and neck) are
# built without it, so DOConvModel converts those 11 by name (state_dict keys unchanged). The
# head's stacked convs are shared across the 3 levels (share_conv=True): each is one DOConv2d
# registered under 3 names, and it folds into one plain conv. rtm_cls / rtm_reg are 1×1 (plain).
# The backbone starts from mmdet's plain CSPNeXt-tiny ImageNet weights (D = 0); for a DO-Conv
# backbone pretrain configs/mmpretrain/cspnext-tiny-doconv_8xb256-rsb-a1-600e_in1k.py and set
# model.backbone.init_cfg.checkpoint to its checkpoint (prefix='backbone.' as in the base).
_base_ = 'mmdet::rtmdet/rtmdet_tiny_8xb32-300e_coco.py'
custom_imports = dict(imports=['do_conv_mm'], allow_failed_imports=False)

conv_cfg = dict(type='DOConv')
model = dict(
    type='DOConvModel',
    model_type='RTMDet',
    doconv=dict(include=['backbone.stem', '*.blocks.*.conv1']),
    backbone=dict(conv_cfg=conv_cfg),
    neck=dict(conv_cfg=conv_cfg),
    bbox_head=dict(conv_cfg=conv_cfg))
