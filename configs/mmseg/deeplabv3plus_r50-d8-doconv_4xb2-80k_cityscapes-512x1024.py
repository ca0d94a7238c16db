# DeepLabV3+ R50-D8 Cityscapes 512x1024 80k with DO-Conv: every k×k conv of backbone, decode
# head and auxiliary head. Norm stays the base's SyncBN (multi-GPU training).
_base_ = 'mmseg::deeplabv3plus/deeplabv3plus_r50-d8_4xb2-80k_cityscapes-512x1024.py'
custom_imports = dict(imports=['do_conv_mm'], allow_failed_imports=False)

conv_cfg = dict(type='DOConv')
model = dict(
    # DepthwiseSeparableASPPHead builds its dilated separable ASPP branches and sep_bottleneck
    # without conv_cfg: DOConvModel converts their 3×3 depthwise convs by name
    # (state_dict keys unchanged; the pointwise 1×1 convs stay plain).
    type='DOConvModel',
    model_type='EncoderDecoder',
    doconv=dict(include=['decode_head.aspp_modules', 'decode_head.sep_bottleneck']),
    backbone=dict(conv_cfg=conv_cfg),
    decode_head=dict(conv_cfg=conv_cfg),
    auxiliary_head=dict(conv_cfg=conv_cfg))
