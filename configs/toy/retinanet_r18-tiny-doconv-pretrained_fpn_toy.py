# The toy DO-Conv detector starting from a DO-Conv-pretrained backbone, D included:
#   python tools/train.py configs/toy/cls_r18-tiny-doconv_toy.py          # pretrain (mmpretrain)
#   python tools/train.py configs/toy/retinanet_r18-tiny-doconv-pretrained_fpn_toy.py
# The classifier checkpoint loads directly (its backbone.* keys are this backbone's); another
# checkpoint: --cfg-options model.backbone.init_cfg.checkpoint=PATH. tools/train.py checks the
# load first (DO-Conv D dropped, D_mul differing or weights missing stop it with the keys named).
_base_ = './retinanet_r18-tiny-doconv_fpn_toy.py'

model = dict(
    backbone=dict(
        init_cfg=dict(
            _delete_=True,
            type='Pretrained',
            checkpoint='work_dirs/cls_r18-tiny-doconv_toy/epoch_6.pth',
            prefix='backbone.')))
