# mmdet detectors -> ONNX Runtime, fixed input shape.
# input_shape=None: the shape the test pipeline gives the export image (toy configs: 128x128);
# tools/deploy_onnx.py --shape H W fixes it (the pipeline then resizes to exactly H x W).
# Outputs: dets (1, N, 5) = x1, y1, x2, y2, score; labels (1, N).
# post_processing: used where the model's test_cfg leaves a value open; score_thr, nms
# iou_threshold and max_per_img come from the model's test_cfg (mmdeploy's rule), so the ONNX
# model keeps the PyTorch model's thresholds.
# opset 16: ONNX RoiAlign has coordinate_transformation_mode='half_pixel' from opset 16 on, which is
# mmcv's RoIAlign(aligned=True) (two-stage detectors). At opset 11 mmdeploy shifts the RoIs by
# half a pixel instead, but ONNX Runtime then still clamps every RoI to at least one feature cell,
# so RoIs smaller than that are pooled differently (measured: 80 of 1000 random-weight Faster
# R-CNN proposals, 0.73 of the features' scale; at opset 16: 6e-7).
_base_ = ['./_onnxruntime_base.py']
onnx_config = dict(output_names=['dets', 'labels'], input_shape=None, opset_version=16)
codebase_config = dict(
    type='mmdet',
    task='ObjectDetection',
    model_type='end2end',
    post_processing=dict(
        score_threshold=0.05,
        confidence_threshold=0.005,
        iou_threshold=0.5,
        max_output_boxes_per_class=200,
        pre_top_k=5000,
        keep_top_k=100,
        background_label_id=-1))
