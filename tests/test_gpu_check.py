"""The prepared GPU check (bench/gpu_check.sh) and what it relies on, exercised on the CPU.

- bench/mmcv_ext_shim.py, which stands in for mmcv's compiled ops where only mmcv-lite can be
  installed: its reference NMS / RoIAlign equal mmcv's own CPU kernels, its other ops fail
  clearly, and mmcv-lite + the shim trains Faster R-CNN exactly as the real mmcv does.
- bench/train_overhead.py's GPU-check features on the CPU: the time guard (partial results
  rather than none) and the Faster R-CNN variant without RoI head.
- bench/gpu_check.sh end to end in its CPU mode (tiny settings).
- the CUDA training path (the launch-light composer) training the benchmark's models and a
  ResNeXt on CPU tensors, in float64 and under bf16 autocast.
The CUDA side of the shim is checked in tests/test_gpu.py (gpu-marked).
"""
import importlib.util
import json
import os
import os.path as osp
import shutil
import subprocess
import sys
import time

import pytest
import torch

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
BENCH = osp.join(REPO, 'bench')


def load_bench_module(filename: str):
    """bench/<filename> imported as a module of its own, bench/ on sys.path while it imports
    its siblings (bench_utils, mm_models)."""
    spec = importlib.util.spec_from_file_location(f'{filename[:-3]}_under_test',
                                                  osp.join(BENCH, filename))
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, BENCH)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(BENCH)
    return module


def load_shim():
    return load_bench_module('mmcv_ext_shim.py')


def bench_env(**extra) -> dict:
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([REPO] + ([env['PYTHONPATH']] if env.get('PYTHONPATH')
                                                  else []))
    env.pop('OUT', None)  # results go to the test's folder, never to a device tool's $OUT
    env.update(OMP_NUM_THREADS='2', PYTHONWARNINGS='ignore', **extra)
    return env


# ------------------------------------------------------------------------------------------------
# The shim's reference ops equal mmcv's compiled CPU ops
# ------------------------------------------------------------------------------------------------
def _random_rois(gen, n, batch, height, width, scale):
    xy = torch.rand(n, 2, generator=gen) * torch.tensor([width / scale * 1.3,
                                                        height / scale * 1.3]) - 3 / scale
    wh = torch.rand(n, 2, generator=gen) * torch.tensor([width / scale, height / scale]) * 0.8
    wh[:3] = 0  # degenerate boxes
    return torch.cat([torch.randint(0, batch, (n, 1), generator=gen).float(), xy, xy + wh], 1)


@pytest.mark.parametrize('scale, ratio, aligned, pooled', [
    (1.0, 0, True, (7, 7)), (0.25, 0, True, (7, 7)), (0.5, 2, True, (3, 5)),
    (0.25, 0, False, (7, 7)), (0.125, 2, False, (2, 2)),
])
def test_reference_roi_align_equals_mmcv(scale, ratio, aligned, pooled):
    ops = pytest.importorskip('mmcv.ops')
    shim = load_shim()
    gen = torch.Generator().manual_seed(int(scale * 100) + ratio)
    x = torch.randn(2, 3, 13, 17, generator=gen, requires_grad=True)
    rois = _random_rois(gen, 60, 2, 13, 17, scale)  # inside, straddling and outside the map
    y = ops.roi_align(x, rois, pooled, scale, ratio, 'avg', aligned)
    g = torch.randn(y.shape, generator=gen)
    (gx,) = torch.autograd.grad(y, x, g)
    y_ref = shim.reference_roi_align_forward(x, rois, *pooled, scale, ratio, aligned)
    gx_ref = shim.reference_roi_align_backward(g, rois, tuple(x.shape), *pooled, scale, ratio,
                                               aligned)
    assert y.abs().sum() > 0 and gx.abs().sum() > 0
    torch.testing.assert_close(y_ref, y.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx_ref, gx, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('offset', [0, 1])
@pytest.mark.parametrize('threshold', [0.3, 0.7])
def test_reference_nms_equals_mmcv(offset, threshold):
    ops = pytest.importorskip('mmcv.ops')
    shim = load_shim()
    gen = torch.Generator().manual_seed(offset * 10 + int(threshold * 10))
    xy = torch.rand(400, 2, generator=gen) * 100
    boxes = torch.cat([xy, xy + torch.rand(400, 2, generator=gen) * 30], 1)
    scores = torch.rand(400, generator=gen)
    _, keep = ops.nms(boxes, scores, threshold, offset)
    ours = shim.reference_nms(boxes, scores, threshold, offset)
    assert 20 < keep.numel() < 400 and torch.equal(ours, keep)


def test_shim_entry_points_fill_mmcv_buffers_and_name_their_backend():
    shim = load_shim()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 10, 12, generator=gen)
    rois = _random_rois(gen, 16, 2, 10, 12, 0.5)
    out = torch.full((16, 4, 7, 7), float('nan'))
    shim.roi_align_forward(x, rois, out, x.new_zeros(0), x.new_zeros(0), aligned_height=7,
                           aligned_width=7, spatial_scale=0.5, sampling_ratio=0, pool_mode=1,
                           aligned=True)
    torch.testing.assert_close(out, shim.reference_roi_align_forward(x, rois, 7, 7, 0.5, 0,
                                                                      True))
    grad_in = torch.ones_like(x)  # mmcv passes zeros; the op accumulates into it
    g = torch.randn(out.shape, generator=gen)
    shim.roi_align_backward(g, rois, None, None, grad_in, aligned_height=7, aligned_width=7,
                            spatial_scale=0.5, sampling_ratio=0, pool_mode=1, aligned=True)
    expected = 1 + shim.reference_roi_align_backward(g, rois, tuple(x.shape), 7, 7, 0.5, 0, True)
    torch.testing.assert_close(grad_in, expected)
    summary = shim.backend_summary()
    assert summary.startswith('cpu: ') and ('torchvision' in summary or 'reference' in summary)
    with pytest.raises(NotImplementedError, match="pool_mode='max'"):
        shim.roi_align_forward(x, rois, out, None, None, aligned_height=7, aligned_width=7,
                               spatial_scale=0.5, sampling_ratio=0, pool_mode=0, aligned=True)


def test_shim_other_ops_exist_but_raise_naming_themselves():
    shim = load_shim()
    assert hasattr(shim, 'deform_conv_forward')  # what mmcv's load_ext checks at import
    with pytest.raises(NotImplementedError, match="'sigmoid_focal_loss_forward'.*mmcv-lite"):
        shim.sigmoid_focal_loss_forward(torch.zeros(1))
    assert not hasattr(shim, '__path__')  # not mistaken for a package
    assert shim.get_compiling_cuda_version() == 'not available'
    assert shim.DO_CONV_MM_SHIM is True


# ------------------------------------------------------------------------------------------------
# mmcv-lite + shim trains Faster R-CNN as the real mmcv does
# ------------------------------------------------------------------------------------------------
TWO_STEPS = r'''
import json, sys
import torch
import mmcv, mmcv._ext
import mm_models
torch.set_num_threads(1)
usable, how = mm_models.detector_ops('cpu')
model = mm_models.build_model('faster_rcnn', True, 'cpu')
mm_models.randomize_D(model, std=0.05)
data = mm_models.synthetic_batch('faster_rcnn', 2, 128)
wrapper = mm_models.optim_wrapper(model)
steps = []
for _ in range(2):
    torch.manual_seed(0)
    steps.append({k: float(v) for k, v in model.train_step(data, wrapper).items()})
print('RESULT ' + json.dumps(dict(shim=getattr(mmcv._ext, 'DO_CONV_MM_SHIM', False),
                                  usable=usable, how=how, steps=steps)))
'''


def _two_steps(pythonpath_first=None):
    env = bench_env()
    env['PYTHONPATH'] = os.pathsep.join(([pythonpath_first] if pythonpath_first else [])
                                        + [BENCH, env['PYTHONPATH']])
    return subprocess.Popen([sys.executable, '-c', TWO_STEPS], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc):
    out, err = proc.communicate(timeout=600)
    lines = [line for line in out.splitlines() if line.startswith('RESULT ')]
    assert proc.returncode == 0 and lines, err[-3000:]
    return json.loads(lines[-1][len('RESULT '):])


def test_mmcv_lite_with_shim_trains_faster_rcnn_like_real_mmcv(tmp_path):
    """A copy of the installed mmcv without its compiled extension (= mmcv-lite) plus the shim
    as mmcv/_ext.py, first on PYTHONPATH: two Faster R-CNN training steps give the losses the
    real mmcv gives (RoIAlign and its gradient, NMS of the proposals, all through the shim)."""
    mmcv = pytest.importorskip('mmcv')
    pytest.importorskip('mmcv.ops')
    pytest.importorskip('mmdet')
    site = tmp_path / 'site'
    shutil.copytree(osp.dirname(mmcv.__file__), site / 'mmcv',
                    ignore=shutil.ignore_patterns('_ext*', 'csrc', '__pycache__'))
    shutil.copy(osp.join(BENCH, 'mmcv_ext_shim.py'), site / 'mmcv' / '_ext.py')
    shimmed, real = _two_steps(str(site)), _two_steps()  # both at once: two cores
    shimmed, real = _result(shimmed), _result(real)
    assert real['shim'] is False and real['usable'] and 'compiled ops' in real['how']
    assert shimmed['shim'] is True and shimmed['usable'] and 'bench shim' in shimmed['how']
    for step_shim, step_real in zip(shimmed['steps'], real['steps']):
        assert step_shim.keys() == step_real.keys() and 'loss_bbox' in step_real
        for key, value in step_real.items():  # float rounding of RoIAlign sums only
            if key == 'acc':
                # The share (%) of the 2 x 512 sampled RoIs classified right: a rounding-level
                # difference may flip one near-tie (it does on torch 2.13.0's PyPI build).
                assert abs(step_shim[key] - value) <= 100 / 1024 + 1e-9, key
            else:
                assert step_shim[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_faster_rcnn_without_roi_head_builds_and_trains():
    pytest.importorskip('mmdet')
    sys.path.insert(0, BENCH)
    try:
        import mm_models
        model = mm_models.build_model('faster_rcnn_rpn', True, 'cpu')
        assert type(model).__name__ == 'RPN' and not hasattr(model, 'roi_head')
        assert len(mm_models.doconv_layers(model)) > 0
        data = mm_models.synthetic_batch('faster_rcnn_rpn', 2, 64)
        torch.manual_seed(0)
        losses = model.train_step(data, mm_models.optim_wrapper(model))
    finally:
        sys.path.remove(BENCH)
    assert set(losses) >= {'loss_rpn_cls', 'loss_rpn_bbox'} and torch.isfinite(losses['loss'])


# ------------------------------------------------------------------------------------------------
# The CUDA training path at model scale, rehearsed on CPU tensors
# ------------------------------------------------------------------------------------------------
def _rehearsal_model(name):
    """(model, loss(dtype)) at 64², D ~ N(0, 0.05²), BN on running statistics and dropout off:
    random-init BN over a few pixels and random masks would amplify rounding chaotically.
    'pspnet': the full segmentation loss; 'faster_rcnn': backbone + neck features (the RoI
    head's proposal ranking swaps near-ties); 'resnext': mmdet's ResNeXt-50 32x4d, whose 3×3
    convs are grouped with 4 to 32 channels per group (the block-diagonal composition)."""
    import mm_models
    if name == 'resnext':
        from mmdet.models.backbones import ResNeXt
        torch.manual_seed(0)
        model = ResNeXt(depth=50, groups=32, base_width=4, conv_cfg=dict(type='DOConv'))
        data = dict(inputs=torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    else:
        model = mm_models.build_model(name, True, 'cpu', 0, 64)
        data = model.data_preprocessor(mm_models.synthetic_batch(name, 2, 64), True)
    mm_models.randomize_D(model, std=0.05)
    for module in model.modules():
        if isinstance(module, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.Dropout,
                               torch.nn.Dropout2d)):
            module.eval()

    def loss(dtype):
        inputs = data['inputs'].to(dtype)
        if name == 'pspnet':
            return model.parse_losses(model(inputs, data['data_samples'], mode='loss'))[0]
        features = model(inputs) if name == 'resnext' else model.extract_feat(inputs)
        return sum(f.float().square().mean() for f in features)
    return model, loss


def _training_gradients(model, loss, monkeypatch, composer, dtype=torch.float32, bf16=False):
    """{name: gradient} of one loss with the layers' composer forced to ``composer`` ('cpu':
    the blocked one, 'cuda': the launch-light one, with the autograd path of groups == 1 and
    depthwise layers), checking that every trained layer used it."""
    from do_conv_mm import DOConv2d, recomposed_conv
    from do_conv_mm.compose_batched import BATCHED_COMPOSER
    from do_conv_mm.compose_blocked import BlockedComposer
    chosen = BATCHED_COMPOSER if composer == 'cuda' else BlockedComposer()
    calls = []
    with monkeypatch.context() as patch:
        compose = chosen.compose
        patch.setattr(chosen, 'compose', lambda *a: calls.append(1) or compose(*a))
        recompose = recomposed_conv.recomposed_conv2d
        patch.setattr('do_conv_mm.doconv.recomposed_conv2d',
                      lambda *a: calls.append(1) or recompose(*a))
        patch.setattr(DOConv2d, '_training_composer', lambda self: chosen)
        model.to(dtype).zero_grad(set_to_none=True)
        torch.manual_seed(0)
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
            value = loss(dtype)
        value.float().backward()
    trained = [m for m in model.modules() if getattr(m, 'D', None) is not None
               and m.D.grad is not None]
    assert trained and len(calls) >= len(trained)  # each trained layer went through it
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if p.grad is not None}


def _worst_relative_error(got: dict, expected: dict, suffix: str = '') -> float:
    assert got.keys() == expected.keys()
    return max(((got[k].double() - expected[k].double()).norm()
                / expected[k].double().norm().clamp_min(1e-300)).item()
               for k in expected if k.endswith(suffix))


@pytest.mark.parametrize('name', ['pspnet', 'faster_rcnn', 'resnext'])
def test_cuda_training_path_at_model_scale_on_cpu(monkeypatch, name):
    """What the GPU check will run, without a GPU: the launch-light (CUDA) composer trains the
    model-zoo models on CPU tensors. float64: every gradient equals the CPU composer's to 1e-9
    (rounding only; fp32 differences would be amplified by the random-init model). bf16
    autocast: the D gradients are as close to the float64 ones as the CPU composer's are
    (within 1.5x + 1e-3; a wrong mapping is off by O(1)), and nothing is lost on the way."""
    pytest.importorskip('mmdet')
    if name == 'pspnet':
        pytest.importorskip('mmseg')
    from do_conv_mm.amp import keep_bf16_out_of_mmcv_ops
    keep_bf16_out_of_mmcv_ops()
    sys.path.insert(0, BENCH)
    try:
        model, loss = _rehearsal_model(name)
        cuda64 = _training_gradients(model, loss, monkeypatch, 'cuda', torch.float64)
        cpu64 = _training_gradients(model, loss, monkeypatch, 'cpu', torch.float64)
        cuda16 = _training_gradients(model, loss, monkeypatch, 'cuda', bf16=True)
        cpu16 = _training_gradients(model, loss, monkeypatch, 'cpu', bf16=True)
    finally:
        sys.path.remove(BENCH)
    assert _worst_relative_error(cuda64, cpu64) < 1e-9
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in cuda16.values())
    error_cuda = _worst_relative_error(cuda16, cpu64, '.D')
    error_cpu = _worst_relative_error(cpu16, cpu64, '.D')
    print(f'{name}: bf16 D-gradient error vs float64: cuda path {error_cuda:.3g}, '
          f'cpu path {error_cpu:.3g}')
    assert error_cuda <= 1.5 * error_cpu + 1e-3


# ------------------------------------------------------------------------------------------------
# Time guard and the end-to-end CPU mode
# ------------------------------------------------------------------------------------------------
def test_train_overhead_time_guard_writes_partial_results(tmp_path):
    """A deadline already passed: one warm-up and one timed round, memory skipped, and a results
    file that says so (rather than no file)."""
    pytest.importorskip('mmseg')
    proc = subprocess.run(
        [sys.executable, osp.join(BENCH, 'train_overhead.py'), '--models', 'pspnet', '--amp',
         '--size', '64', '--batch', '2', '--reps', '30', '--warmup', '5', '--mem-reps', '1',
         '--no-profile', '--deadline', f'{time.time():.0f}', '--out-dir', str(tmp_path)],
        env=bench_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    text = (tmp_path / 'train_overhead_pspnet_bf16.md').read_text()
    assert '**Partial**: 1 of 30 timed rounds' in text
    assert 'Not measured: time guard' in text
    assert 'bf16 autocast' in text
    summary = [json.loads(line.split(' ', 1)[1]) for line in proc.stdout.splitlines()
               if line.startswith('TRAIN_OVERHEAD_SUMMARY ')][-1]
    assert summary['models'][0]['rounds'] == 1


def test_gpu_check_cpu_mode_end_to_end(tmp_path):
    """bash bench/gpu_check.sh --device cpu, one model, one precision, tiny settings: every
    stage runs, the gpu tests are collected and skipped, the per-layer tables and the three
    twins' timings (the Function twin's too), the results and the log are written."""
    pytest.importorskip('mmdet')
    out = tmp_path / 'out'
    proc = subprocess.run(
        ['bash', osp.join(BENCH, 'gpu_check.sh'), '--device', 'cpu', '--models', 'faster_rcnn',
         '--precisions', 'fp32', '--reps', '1', '--warmup', '1', '--size', '64',
         '--out-dir', str(out)],
        env=bench_env(), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = (out / 'gpu_check_cpu.md').read_text()
    assert '| gpu tests | ' in summary and ' skipped |' in summary
    assert '| benchmark fp32 | 1/1 models |' in summary and '| all | ok |' in summary
    assert '| layer costs | ok (2 layers) |' in summary
    for name in ('host_overhead.md', 'host_overhead_16ch_8px.md'):
        layer_table = (out / name).read_text()
        assert "| DOConv2d, GPU path: autograd ops, W' recomposed (kernels > 1 MiB) |" \
            in layer_table
    assert '## Training overhead, DO-Conv / plain (medians)' in summary
    details = (out / 'train_overhead_faster_rcnn.md').read_text()
    assert 'Full model; RoIAlign and NMS from mmcv 2.1.0 compiled ops' in details
    assert '#### Top operators by self CPU time: doconv' in details
    assert '#### Top operators by self CPU time: doconv_function' in details
    assert '| wall-clock | DO-Conv, all layers through the Function |' in details
    assert '### Peak memory\n\n| memory |' in details  # measured, not skipped
    log = (out / 'gpu_check.log').read_text()
    assert '== [setup] done' in log and '== gpu_check: exit 0' in log


# ------------------------------------------------------------------------------------------------
# GPU peak memory, rehearsed on the CPU
# ------------------------------------------------------------------------------------------------
def test_live_bytes_counts_new_storages_until_torch_frees_them():
    """The rehearsal's counter: a new output storage counts until its last tensor goes (a view
    keeps it); views, in-place and out= results allocate nothing. Exact byte counts."""
    live_bytes = load_bench_module('memory_rehearsal.py').LiveBytes
    with live_bytes() as counter:
        a = torch.zeros(1000)               # 4000 live
        b = a + 1                           # 8000
        view = a.view(10, 100)
        del a                               # the view keeps a's storage: 8000
        b.add_(1)                           # in place: 8000
        torch.mul(b, 2, out=b)              # out=: 8000
        del view                            # 4000
        c = torch.zeros(2000)               # 12000 (the peak)
        del b, c                            # 0
    assert (counter.peak, counter.live) == (12000, 0)


def test_memory_rehearsal_writes_both_precisions_per_model(tmp_path):
    """bench/memory_rehearsal.py end to end at a toy size: one row per precision, the DO-Conv
    twin holds more (D and its momentum) and the ratio is the peaks' quotient."""
    pytest.importorskip('mmseg')
    rehearsal = load_bench_module('memory_rehearsal.py')
    rehearsal.main(['--models', 'pspnet', '--size', '64', '--batch', '2',
                    '--out-dir', str(tmp_path)])
    result = rehearsal.run('pspnet', False, 2, 64)
    table = (tmp_path / 'memory_rehearsal.md').read_text()
    rows = [line for line in table.splitlines() if line.startswith('| PSPNet')]
    assert [row.split(' | ')[1] for row in rows] == ['fp32', 'AMP (bf16)']
    assert result['doconv']['held'] > result['plain']['held']
    assert result['ratio'] == result['doconv']['peak'] / result['plain']['peak'] > 1
    assert f'| {result["ratio"]:.3f} |' in rows[0]
    assert "One layer's backward" in table


def test_one_layer_backward_holds_at_most_two_kernels_more_than_a_plain_conv():
    """The rehearsal's one-layer reading. Through the Function, DO-Conv's backward allocates
    dL/dW' and dL/dweight: one kernel-sized tensor more than a plain conv's dL/dweight, not also
    the recomposed W' (freed early). Through the autograd ops it holds dL/dW', the bmm's share of
    dL/dweight and their sum: one more. Slack: the input gradient and D's."""
    reading = load_bench_module('memory_rehearsal.py').layer_backward_bytes(256, 128, 4)
    kernel, slack = reading['kernel'], 256 * 4 * 4 * 4 + 256 * 9 * 9 * 4
    assert reading['plain'] >= kernel
    assert reading['function'] <= reading['plain'] + kernel + slack
    assert reading['doconv'] <= reading['plain'] + 2 * kernel + slack


def test_host_overhead_variants_are_exact_and_the_table_is_written(tmp_path):
    """bench/host_overhead.py: every DO-Conv variant it times (the GPU path's autograd ops with
    W' kept and recomposed, its Function, the CPU path) equals the formula in float64 to 1e-12,
    and a tiny run writes one row per variant with dispatcher call counts."""
    bench = load_bench_module('host_overhead.py')
    assert bench.check_exact() < 1e-12
    bench.main(['--reps', '2', '--inner', '5', '--out-dir', str(tmp_path)])
    rows = [line for line in (tmp_path / 'host_overhead.md').read_text().splitlines()
            if line.startswith('| plain') or line.startswith('| DOConv2d')]
    assert len(rows) == 5
    plain_calls = rows[0].split(' | ')[-2:]
    assert plain_calls == ['1', '5 |']  # conv forward; its backward, sum's, 3 accumulations
