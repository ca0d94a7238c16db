# MobileNetV2 1.0x ImageNet-1k (8×32, 300 epochs) with DO-Conv: every k×k conv of the backbone
# (3×3 stem and the 17 inverted residuals' depthwise 3×3s, groups = channels; the expand /
# project 1×1s and the last 1×1 stay plain). The head is Linear.
_base_ = 'mmpretrain::mobilenet_v2/mobilenet-v2_8xb32_in1k.py'
custom_imports = dict(imports=['do_conv_mm'], allow_failed_imports=False)

model = dict(backbone=dict(conv_cfg=dict(type='DOConv')))
