# RetinaNet EfficientNet-B3 FPN with DO-Conv: every k×k conv of backbone, neck and head.
_base_ = 'mmdet::efficientnet/retinanet_effb3_fpn_8xb4-crop896-1x_coco.py'
custom_imports = dict(imports=['do_conv_mm'], allow_failed_imports=False)

conv_cfg = dict(type='DOConv')
model = dict(
    # RetinaSepBNHead builds its 3×3 predictors retina_cls / retina_reg without conv_cfg:
    # DOConvModel converts them by name (state_dict keys unchanged).
    type='DOConvModel',
    model_type='RetinaNet',
    doconv=dict(include=['bbox_head.retina_cls', 'bbox_head.retina_reg']),
    # EfficientNet pads the TensorFlow way (its default conv_cfg is Conv2dAdaptivePadding, which
    # its ImageNet weights were trained with); DOConvAdaptivePadding keeps that padding, where
    # 'DOConv' would pad stride-2 convs symmetrically.
    backbone=dict(conv_cfg=dict(type='DOConvAdaptivePadding')),
    neck=dict(conv_cfg=conv_cfg),
    bbox_head=dict(conv_cfg=conv_cfg))
