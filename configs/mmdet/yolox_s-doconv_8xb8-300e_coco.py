# YOLOX-s 300e COCO with DO-Conv: every k×k conv of backbone (CSPDarknet, Focus stem included),
# neck (YOLOXPAFPN) and head (the stacked 3×3s; the predictors are 1×1), all through conv_cfg.
_base_ = 'mmdet::yolox/yolox_s_8xb8-300e_coco.py'
custom_imports = dict(imports=['do_conv_mm'], allow_failed_imports=False)

conv_cfg = dict(type='DOConv')
model = dict(
    backbone=dict(conv_cfg=conv_cfg),
    neck=dict(conv_cfg=conv_cfg),
    bbox_head=dict(conv_cfg=conv_cfg))
