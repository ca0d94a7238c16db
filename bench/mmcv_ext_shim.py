"""Stand-in for mmcv's compiled extension ``mmcv._ext``, for a pure-Python mmcv (mmcv-lite).

Only for the GPU check (bench/gpu_check.sh) on machines where mmcv 2.1.0 has no wheel for the
installed torch and no time to be built: ``mmcv-lite`` 2.1.0 (mmcv without compiled ops) is
installed and this file is copied to ``<site>/mmcv/_ext.py``. Then ``import mmcv.ops`` (which
mmdet and mmseg need at import) works, and:

- ``nms``, ``roi_align_forward`` and ``roi_align_backward`` (all that Faster R-CNN's training
  step calls) are served by torchvision's kernels (``torch.ops.torchvision.*``, CPU or CUDA),
  after a one-time self-check per device against the pure-PyTorch reference below. Where
  torchvision's ops cannot load or disagree, the reference serves them (exact, slow).
- every other op raises ``NotImplementedError`` naming itself when called.

The reference implementations follow mmcv 2.1.0's CPU kernels (``nms.cpp``, ``roi_align.cpp``):
same sample positions, bilinear weights, boundary rules and greedy order. tests/test_gpu_check.py
checks them against the real mmcv ops; tests/test_gpu.py checks torchvision's path against them
on CUDA. Results files say which backend served the ops (``backend_summary()``).

This module must not import mmcv (it *is* part of mmcv once installed).
"""
import sys
from typing import Dict, Tuple

import torch

DO_CONV_MM_SHIM = True
__all__ = ['nms', 'roi_align_forward', 'roi_align_backward', 'get_compiler_version',
           'get_compiling_cuda_version', 'backend_summary', 'reference_nms',
           'reference_roi_align_forward', 'reference_roi_align_backward']

# device type ('cpu', 'cuda') -> 'torchvision' or 'reference (<why>)', decided on first use
_BACKENDS: Dict[str, str] = {}


def get_compiler_version() -> str:
    return 'none (mmcv-lite + do_conv_mm bench shim)'


def get_compiling_cuda_version() -> str:
    return 'not available'


def backend_summary() -> str:
    """Which implementation served the ops on each device used so far, e.g.
    ``'cuda: torchvision'``; ``'not used yet'`` before the first call."""
    return ', '.join(f'{dev}: {b}' for dev, b in sorted(_BACKENDS.items())) or 'not used yet'


def __getattr__(name: str):
    """Every other mmcv op: present (``load_ext`` checks with hasattr) but raises when called."""
    if name.startswith('__'):
        raise AttributeError(name)

    def unavailable(*args, **kwargs):
        raise NotImplementedError(
            f'mmcv op {name!r} is not available: this mmcv is mmcv-lite (no compiled ops) with '
            f'do_conv_mm\'s bench shim, which serves only nms and roi_align. Install mmcv with '
            f'its ops (bash tools/install.sh) for other models.')
    unavailable.__name__ = name
    return unavailable


# ------------------------------------------------------------------------------------------------
# Reference implementations (pure PyTorch, mmcv 2.1.0 CPU semantics)
# ------------------------------------------------------------------------------------------------
def reference_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
                  offset: int = 0) -> torch.Tensor:
    """Indices kept by greedy NMS, highest score first (mmcv ``nms_cpu``), on ``boxes.device``.

    Runs on the CPU in float32 whatever the input device, as mmcv's kernel computes.
    """
    device = boxes.device
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    b = boxes.detach().to('cpu', torch.float32)
    x1, y1, x2, y2 = (b[:, k].contiguous() for k in range(4))
    areas = (x2 - x1 + offset) * (y2 - y1 + offset)
    order = scores.detach().to('cpu', torch.float32).sort(0, descending=True)[1]
    x1, y1, x2, y2, areas = x1[order], y1[order], x2[order], y2[order], areas[order]
    n = order.numel()
    keep = torch.ones(n, dtype=torch.bool)
    zero = torch.zeros((), dtype=torch.float32)
    for i in range(n):
        if not keep[i]:
            continue
        rest = slice(i + 1, n)
        w = torch.maximum(zero, torch.minimum(x2[i], x2[rest]) - torch.maximum(x1[i], x1[rest])
                          + offset)
        h = torch.maximum(zero, torch.minimum(y2[i], y2[rest]) - torch.maximum(y1[i], y1[rest])
                          + offset)
        inter = w * h
        ovr = inter / (areas[i] + areas[rest] - inter)
        keep[rest] &= ~(ovr > iou_threshold)
    return order[keep].to(device)


def _axis_weights(start: torch.Tensor, bin_size: torch.Tensor, grid: torch.Tensor,
                  pooled: int, size: int) -> torch.Tensor:
    """(R, pooled, size): summed bilinear weights of the samples of each bin along one axis.

    Sample ``s`` of bin ``p`` sits at ``start + p * bin + (s + 0.5) * bin / grid`` (float32,
    as mmcv). A sample outside [-1, size] contributes nothing; below 0 it is clamped to 0; at or
    past the last pixel it reads the last pixel only (mmcv's ``bilinear_interpolate``).
    """
    R = start.shape[0]
    gmax = max(int(grid.max()), 1) if R else 1
    p = torch.arange(pooled, dtype=torch.float32).view(1, pooled, 1)
    s = torch.arange(gmax, dtype=torch.float32).view(1, 1, gmax)
    g = grid.to(torch.float32).view(R, 1, 1)
    pos = (start.view(R, 1, 1) + p * bin_size.view(R, 1, 1)
           + (s + 0.5) * bin_size.view(R, 1, 1) / g.clamp(min=1))
    live = (s < g) & (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0)
    low = pos.floor().to(torch.long)
    at_end = low >= size - 1
    low = torch.where(at_end, torch.full_like(low, size - 1), low)
    high = torch.where(at_end, low, low + 1)
    pos = torch.where(at_end, low.to(torch.float32), pos)
    frac = pos - low.to(torch.float32)
    w_low = torch.where(live, 1.0 - frac, torch.zeros_like(frac))
    w_high = torch.where(live, frac, torch.zeros_like(frac))
    weights = torch.zeros(R, pooled, size, dtype=torch.float32)
    weights.scatter_add_(2, low.view(R, pooled, gmax), w_low.view(R, pooled, gmax))
    weights.scatter_add_(2, high.view(R, pooled, gmax), w_high.view(R, pooled, gmax))
    return weights


def _roi_geometry(rois: torch.Tensor, pooled_h: int, pooled_w: int, spatial_scale: float,
                  sampling_ratio: int, aligned: bool, height: int, width: int):
    """Per-RoI batch index, row weights (R, ph, H), column weights (R, pw, W), 1/count and the
    row / column ranges the weights touch (so each RoI reads only its window)."""
    r = rois.detach().to('cpu', torch.float32)
    R = r.shape[0]
    offset = 0.5 if aligned else 0.0
    x1 = r[:, 1] * spatial_scale - offset
    y1 = r[:, 2] * spatial_scale - offset
    roi_w = r[:, 3] * spatial_scale - offset - x1
    roi_h = r[:, 4] * spatial_scale - offset - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_h, bin_w = roi_h / pooled_h, roi_w / pooled_w
    if sampling_ratio > 0:
        grid_h = torch.full((R,), sampling_ratio, dtype=torch.long)
        grid_w = grid_h.clone()
    else:
        grid_h = torch.ceil(roi_h / pooled_h).to(torch.long).clamp(min=0)
        grid_w = torch.ceil(roi_w / pooled_w).to(torch.long).clamp(min=0)
    count = (grid_h * grid_w).clamp(min=1).to(torch.float32)
    wy = _axis_weights(y1, bin_h, grid_h, pooled_h, height)
    wx = _axis_weights(x1, bin_w, grid_w, pooled_w, width)
    rows, cols = wy.sum(1) != 0, wx.sum(1) != 0
    ranges = []
    for k in range(R):
        ys, xs = rows[k].nonzero().flatten(), cols[k].nonzero().flatten()
        if ys.numel() == 0 or xs.numel() == 0:
            ranges.append(None)  # no sample inside the map: output 0
        else:
            ranges.append((int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1))
    return r[:, 0].to(torch.long).tolist(), wy, wx, (1.0 / count).tolist(), ranges


def reference_roi_align_forward(input: torch.Tensor, rois: torch.Tensor, pooled_h: int,
                                pooled_w: int, spatial_scale: float, sampling_ratio: int,
                                aligned: bool) -> torch.Tensor:
    """RoIAlign, average pooling (mmcv ``roi_align_forward`` with pool_mode 1), float32 math;
    returns (R, C, pooled_h, pooled_w) in ``input.dtype`` on ``input.device``."""
    N, C, H, W = input.shape
    R = rois.shape[0]
    out = torch.zeros(R, C, pooled_h, pooled_w, dtype=torch.float32, device=input.device)
    if R == 0:
        return out.to(input.dtype)
    batch, wy, wx, inv_count, ranges = _roi_geometry(
        rois, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned, H, W)
    wy, wx = wy.to(input.device), wx.to(input.device)
    feats = input.detach().to(torch.float32)
    for k in range(R):
        if ranges[k] is None:
            continue
        y0, y1, x0, x1 = ranges[k]
        window = feats[batch[k], :, y0:y1, x0:x1]                    # (C, h, w)
        out[k] = (wy[k, :, y0:y1] @ window @ wx[k, :, x0:x1].T) * inv_count[k]
    return out.to(input.dtype)


def reference_roi_align_backward(grad_output: torch.Tensor, rois: torch.Tensor,
                                 input_shape: Tuple[int, int, int, int], pooled_h: int,
                                 pooled_w: int, spatial_scale: float, sampling_ratio: int,
                                 aligned: bool) -> torch.Tensor:
    """Gradient of :func:`reference_roi_align_forward` w.r.t. its input (float32 math),
    shape ``input_shape``, dtype and device of ``grad_output``."""
    N, C, H, W = input_shape
    grad_in = torch.zeros(N, C, H, W, dtype=torch.float32, device=grad_output.device)
    R = rois.shape[0]
    if R == 0:
        return grad_in.to(grad_output.dtype)
    batch, wy, wx, inv_count, ranges = _roi_geometry(
        rois, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned, H, W)
    wy, wx = wy.to(grad_output.device), wx.to(grad_output.device)
    g = grad_output.detach().to(torch.float32)
    for k in range(R):
        if ranges[k] is None:
            continue
        y0, y1, x0, x1 = ranges[k]
        grad_in[batch[k], :, y0:y1, x0:x1] += (
            wy[k, :, y0:y1].T @ g[k] @ wx[k, :, x0:x1]) * inv_count[k]
    return grad_in.to(grad_output.dtype)


# ------------------------------------------------------------------------------------------------
# torchvision backend, chosen per device after a self-check
# ------------------------------------------------------------------------------------------------
def _tv_roi_align(input, rois, ph, pw, scale, ratio, aligned):
    return torch.ops.torchvision.roi_align(input.float(), rois.float(), scale, ph, pw, ratio,
                                           aligned)


def _tv_roi_align_backward(grad, rois, shape, ph, pw, scale, ratio, aligned):
    N, C, H, W = shape
    return torch.ops.torchvision._roi_align_backward(grad.float(), rois.float(), scale, ph, pw,
                                                     N, C, H, W, ratio, aligned)


def _tv_nms(boxes, scores, iou_threshold):
    return torch.ops.torchvision.nms(boxes.float(), scores.float(), iou_threshold)


def _self_check(device: torch.device) -> None:
    """torchvision's three kernels on ``device`` vs the reference, on random data (fresh each
    process). Raises on any disagreement."""
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(2, 3, 13, 17, generator=gen).to(device)
    xy = torch.rand(24, 2, generator=gen) * torch.tensor([60.0, 46.0]) - 6
    wh = torch.rand(24, 2, generator=gen) * 30
    rois = torch.cat([torch.randint(0, 2, (24, 1), generator=gen).float(), xy, xy + wh],
                     1).to(device)
    for scale, ratio, aligned in ((0.25, 0, True), (0.25, 2, False)):
        ref = reference_roi_align_forward(x, rois, 7, 7, scale, ratio, aligned)
        got = _tv_roi_align(x, rois, 7, 7, scale, ratio, aligned)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
        g = torch.randn(ref.shape, generator=gen).to(device)
        ref_b = reference_roi_align_backward(g, rois, tuple(x.shape), 7, 7, scale, ratio, aligned)
        got_b = _tv_roi_align_backward(g, rois, tuple(x.shape), 7, 7, scale, ratio, aligned)
        torch.testing.assert_close(got_b, ref_b, rtol=1e-4, atol=1e-5)
    boxes = torch.cat([xy, xy + wh + 1], 1).to(device)
    scores = torch.rand(24, generator=gen).to(device)
    for thr in (0.3, 0.7):
        ref_k = reference_nms(boxes, scores, thr, 0)
        got_k = _tv_nms(boxes, scores, thr)
        if not torch.equal(ref_k.cpu(), got_k.cpu()):
            raise AssertionError(f'nms kept {got_k.tolist()}, reference {ref_k.tolist()}')


def _backend(device: torch.device) -> str:
    key = device.type
    if key not in _BACKENDS:
        try:
            import torchvision  # noqa: F401  (loads torchvision's operator library)
            _self_check(device)
            _BACKENDS[key] = 'torchvision'
        except Exception as err:  # noqa: BLE001 - any failure means: use the reference
            reason = f'{type(err).__name__}: {err}'.splitlines()[0][:160]
            _BACKENDS[key] = f'reference ({reason})'
            print(f'[do_conv_mm mmcv shim] {key}: torchvision ops unusable ({reason}); '
                  f'using the pure-PyTorch reference (slow).', file=sys.stderr, flush=True)
    return _BACKENDS[key]


# ------------------------------------------------------------------------------------------------
# The mmcv._ext entry points (signatures as mmcv 2.1.0's Python wrappers call them)
# ------------------------------------------------------------------------------------------------
def nms(bboxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
        offset: int = 0) -> torch.Tensor:
    if offset == 0 and bboxes.numel() and _backend(bboxes.device) == 'torchvision':
        return _tv_nms(bboxes, scores, float(iou_threshold))
    return reference_nms(bboxes, scores, float(iou_threshold), int(offset))


def _check_avg(pool_mode: int) -> None:
    if pool_mode != 1:
        raise NotImplementedError("mmcv shim: RoIAlign pool_mode='max' is not served "
                                  "(Faster R-CNN uses 'avg').")


def roi_align_forward(input, rois, output, argmax_y, argmax_x, aligned_height: int,
                      aligned_width: int, spatial_scale: float, sampling_ratio: int,
                      pool_mode: int, aligned: bool) -> None:
    _check_avg(pool_mode)
    args = (int(aligned_height), int(aligned_width), float(spatial_scale), int(sampling_ratio),
            bool(aligned))
    if rois.shape[0] and _backend(input.device) == 'torchvision':
        output.copy_(_tv_roi_align(input, rois, *args))
    else:
        output.copy_(reference_roi_align_forward(input, rois, *args))


def roi_align_backward(grad_output, rois, argmax_y, argmax_x, grad_input, aligned_height: int,
                       aligned_width: int, spatial_scale: float, sampling_ratio: int,
                       pool_mode: int, aligned: bool) -> None:
    _check_avg(pool_mode)
    args = (int(aligned_height), int(aligned_width), float(spatial_scale), int(sampling_ratio),
            bool(aligned))
    shape = tuple(grad_input.shape)
    if rois.shape[0] and _backend(grad_output.device) == 'torchvision':
        grad_input.add_(_tv_roi_align_backward(grad_output, rois, shape, *args))
    else:
        grad_input.add_(reference_roi_align_backward(grad_output, rois, shape, *args))

