# DO-Conv twin of fpn_r18-tiny_toy.py: identical recipe, DO-Conv in every conv that takes conv_cfg
# (ResNetV1c stem, blocks and downsamples; FPN; FPNHead convs). conv_seg stays plain.
_base_ = './fpn_r18-tiny_toy.py'

custom_imports = dict(imports=['do_conv_mm'], allow_failed_imports=False)
conv_cfg = dict(type='DOConv')
model = dict(
    backbone=dict(conv_cfg=conv_cfg),
    neck=dict(conv_cfg=conv_cfg),
    decode_head=dict(conv_cfg=conv_cfg))
