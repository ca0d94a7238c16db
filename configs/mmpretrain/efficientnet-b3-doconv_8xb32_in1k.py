# EfficientNet-B3 ImageNet-1k (8×32) with DO-Conv: every k×k conv of the backbone (3×3 stem and
# the depthwise 3×3 / 5×5 convs; the expand / project / SE 1×1s stay plain). The head is Linear.
# EfficientNet pads the TensorFlow way (its default conv_cfg is Conv2dAdaptivePadding);
# DOConvAdaptivePadding keeps that padding. The mmdet RetinaNet EfficientNet-B3 config
# (configs/mmdet/retinanet_effb3-doconv_fpn_8xb4-crop896-1x_coco.py) has this backbone's keys and
# shapes but the last 1×1 conv (layers.6, left unused), so this checkpoint initialises that
# detector's backbone with D (its init_cfg prefix='backbone').
_base_ = 'mmpretrain::efficientnet/efficientnet-b3_8xb32_in1k.py'
custom_imports = dict(imports=['do_conv_mm'], allow_failed_imports=False)

model = dict(backbone=dict(conv_cfg=dict(type='DOConvAdaptivePadding')))
