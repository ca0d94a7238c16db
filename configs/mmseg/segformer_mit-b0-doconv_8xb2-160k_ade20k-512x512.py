# SegFormer MiT-B0 160k ADE20K 512×512 with DO-Conv: every k×k conv of the Mix Transformer, by
# name (MixVisionTransformer takes no conv_cfg): the 4 overlapping patch embeddings (7×7 / 3×3),
# the 8 depthwise 3×3s of the Mix-FFNs and the 6 attention spatial-reduction convs (8×8 / 4×4 /
# 2×2, kernel = stride; 0.30 M of the 0.66 M extra training parameters: leave them out with
# exclude=['backbone.*.attn.sr'] for a lighter run). The SegFormer head is 1×1 only.
_base_ = 'mmseg::segformer/segformer_mit-b0_8xb2-160k_ade20k-512x512.py'
custom_imports = dict(imports=['do_conv_mm'], allow_failed_imports=False)

model = dict(type='DOConvModel', model_type='EncoderDecoder', doconv=dict(include=['backbone']))
