# PSPNet R50-D8 Cityscapes 512x1024 80k with DO-Conv: every k×k conv of backbone, decode head
# (PPM convs are 1×1, the bottleneck 3×3) and auxiliary head. Norm stays the base's SyncBN.
_base_ = 'mmseg::pspnet/pspnet_r50-d8_4xb2-80k_cityscapes-512x1024.py'
custom_imports = dict(imports=['do_conv_mm'], allow_failed_imports=False)

conv_cfg = dict(type='DOConv')
model = dict(
    backbone=dict(conv_cfg=conv_cfg),
    decode_head=dict(conv_cfg=conv_cfg),
    auxiliary_head=dict(conv_cfg=conv_cfg))
