# Shared part of the ONNX Runtime deploy configs of do_conv_mm (mmdeploy 1.3.1 config format;
# mmdeploy's wheel ships no configs, so these are written for this project's models).
# opset 11 (segmentation; detection overrides it with 16, see there): every op the folded
# segmentors need exists there, and onnxruntime >= 1.15 runs it.
# optimize=False: mmdeploy's graph optimizer needs its TorchScript extension, which the wheel
# does not ship (with True it only logs "Can not optimize model").
onnx_config = dict(
    type='onnx',
    export_params=True,
    keep_initializers_as_inputs=False,
    opset_version=11,
    save_file='end2end.onnx',
    input_names=['input'],
    output_names=['output'],
    input_shape=None,
    optimize=False)
backend_config = dict(type='onnxruntime')
