# DO-Conv twin of fcn_r18-tiny-d8_toy.py: identical recipe, DO-Conv in every conv that takes
# conv_cfg (ResNetV1c stem, blocks and downsamples; FCNHead convs). conv_seg stays plain.
_base_ = './fcn_r18-tiny-d8_toy.py'

custom_imports = dict(imports=['do_conv_mm'], allow_failed_imports=False)
conv_cfg = dict(type='DOConv')
model = dict(
    backbone=dict(conv_cfg=conv_cfg),
    decode_head=dict(conv_cfg=conv_cfg))
