# mmseg segmentors -> ONNX Runtime, fixed input shape (input_shape=None: the shape the test
# pipeline gives the export image; tools/deploy_onnx.py --shape H W fixes it).
# with_argmax=False: the output is the decode head's logits resized to the input,
# (1, num_classes, H, W), so the runtime can be checked against PyTorch value by value;
# mmdeploy's segmentation model takes the argmax when it packs the prediction.
_base_ = ['./_onnxruntime_base.py']
codebase_config = dict(type='mmseg', task='Segmentation', with_argmax=False)
