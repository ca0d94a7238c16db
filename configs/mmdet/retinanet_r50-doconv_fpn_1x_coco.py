# RetinaNet R50-FPN 1x COCO with DO-Conv: every k×k conv of backbone, neck and head.
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['do_conv_mm'], allow_failed_imports=False)

conv_cfg = dict(type='DOConv')
model = dict(
    # RetinaHead builds its 3×3 predictors retina_cls / retina_reg without conv_cfg:
    # DOConvModel converts them by name (state_dict keys unchanged).
    type='DOConvModel',
    model_type='RetinaNet',
    doconv=dict(include=['bbox_head.retina_cls', 'bbox_head.retina_reg']),
    backbone=dict(conv_cfg=conv_cfg),
    neck=dict(conv_cfg=conv_cfg),
    bbox_head=dict(conv_cfg=conv_cfg))
