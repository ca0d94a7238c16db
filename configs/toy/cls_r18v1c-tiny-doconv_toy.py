# cls_r18-tiny-doconv_toy.py with the toy segmentor's backbone: ResNetV1c (deep 3×3 stem). Its
# checkpoint initialises fpn_r18-tiny-doconv_toy.py once tools/extract_backbone.py has renamed the
# stem (mmpretrain's stem.N.conv / stem.N.bn are mmseg's stem.3N / stem.3N+1).
_base_ = './cls_r18-tiny-doconv_toy.py'

model = dict(backbone=dict(type='ResNetV1c'))
