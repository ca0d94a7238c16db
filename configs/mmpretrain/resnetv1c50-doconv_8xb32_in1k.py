# ResNetV1c-50 ImageNet-1k (8×32, 100 epochs) with DO-Conv: every k×k conv of the backbone (deep
# stem of three 3×3s, 16 bottleneck 3×3s; the 1×1s stay plain). The head is Linear. This is the
# backbone of mmseg's R50-D8 models; its keys are theirs except the stem: mmpretrain's
# stem.N.conv / stem.N.bn are mmseg's stem.3N / stem.3N+1.
_base_ = 'mmpretrain::resnet/resnetv1c50_8xb32_in1k.py'
custom_imports = dict(imports=['do_conv_mm'], allow_failed_imports=False)

model = dict(backbone=dict(conv_cfg=dict(type='DOConv')))
