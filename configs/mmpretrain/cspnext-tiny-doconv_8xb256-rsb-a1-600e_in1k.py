# CSPNeXt-tiny ImageNet-1k (8×256, RSB-A1, 600 epochs: mmdet's recipe for RTMDet-tiny's ImageNet
# backbone) with DO-Conv in every k×k conv of the backbone: conv_cfg reaches the stages'
# downsampling 3×3s and the blocks' depthwise 5×5s; the stem's three 3×3 ConvModules and every
# CSPNeXtBlock's 3×3 conv1 are built without conv_cfg, so DOConvModel converts them by name (as in
# configs/toy/rtmdet_tiny-doconv_toy.py). The backbone's keys are RTMDet-tiny's: load the
# checkpoint with init_cfg=dict(type='Pretrained', checkpoint=..., prefix='backbone.').
_base_ = 'mmdet::rtmdet/classification/cspnext-tiny_8xb256-rsb-a1-600e_in1k.py'
custom_imports = dict(imports=['do_conv_mm'], allow_failed_imports=False)

conv_cfg = dict(type='DOConv')
model = dict(
    # Inherited through mmdet::, the base's model dict carries _scope_='mmdet', where
    # ImageClassifier does not exist; the recipe means mmpretrain's (its backbone says mmdet.).
    _scope_='mmpretrain',
    type='DOConvModel',
    model_type='ImageClassifier',
    doconv=dict(include=['backbone.stem', 'backbone.*.blocks.*.conv1']),
    backbone=dict(conv_cfg=conv_cfg))
# The recipe's Lamb scales each step by the parameter's own norm (trust ratio): D, which starts at
# 0, would stay there. mmpretrain's Lamb does not adapt parameters without weight decay, so D gets
# none (as biases and norms in this recipe); it then trains as it does under SGD / AdamW.
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'.D': dict(decay_mult=0.)}))
