# FCOS R50-caffe-FPN GN-head 1x COCO with DO-Conv: every k×k conv of backbone, neck and head.
_base_ = 'mmdet::fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py'
custom_imports = dict(imports=['do_conv_mm'], allow_failed_imports=False)

conv_cfg = dict(type='DOConv')
model = dict(
    # FCOSHead builds its 3×3 predictors conv_cls / conv_reg / conv_centerness without
    # conv_cfg: DOConvModel converts them by name (state_dict keys unchanged).
    type='DOConvModel',
    model_type='FCOS',
    doconv=dict(include=[
        'bbox_head.conv_cls', 'bbox_head.conv_reg', 'bbox_head.conv_centerness'
    ]),
    backbone=dict(conv_cfg=conv_cfg),
    neck=dict(conv_cfg=conv_cfg),
    bbox_head=dict(conv_cfg=conv_cfg))
