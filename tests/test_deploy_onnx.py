"""Deployment: fold -> mmdeploy ONNX export -> ONNX Runtime, and the train/deploy mix-up guard.

The export tool runs in the deploy venv (.venv-deploy, made by tools/run_tests.sh through
tools/install_deploy.sh; $DO_CONV_MM_DEPLOY_PYTHON overrides), as a user runs it; the tests read
its deploy_report.json. Tolerances are the tool's own (see do_conv_mm/onnx_deploy.py): dense
outputs max|ORT - PyTorch| <= 1e-5 + 1e-4 * max|PyTorch| (measured ~1e-6 relative; a wrong
export is ~1e-1), detections matched one to one with |score diff| <= 1e-4 and boxes within
1e-2 px. Metrics are compared exactly.
"""
import importlib.util
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch
from mmengine.config import Config

from training_helpers import REPO, run_tool, tool_env

import do_conv_mm  # noqa: F401  (registers DOConv, safe checkpoint globals)
from do_conv_mm.checkpoint import CheckpointError, load_checkpoint_file
from do_conv_mm.checkpoint_guard import check_checkpoint_config, describe_checkpoint
from do_conv_mm.mmdeploy_compat import mmdeploy_export_compat, torchscript_export_kwargs

DEPLOY_PY = os.environ.get('DO_CONV_MM_DEPLOY_PYTHON',
                           osp.join(REPO, '.venv-deploy', 'bin', 'python'))
DET_CFG = osp.join(REPO, 'configs/toy/retinanet_r18-tiny-doconv_fpn_toy.py')
SEG_CFG = osp.join(REPO, 'configs/toy/fpn_r18-tiny-doconv_toy.py')
FRCNN = osp.join(REPO, 'configs/mmdet/faster-rcnn_r50-doconv_fpn_1x_coco.py')
PSPNET = osp.join(REPO, 'configs/mmseg/pspnet_r50-d8-doconv_4xb2-80k_cityscapes-512x1024.py')
NO_VAL = ('val_cfg=None', 'val_dataloader=None', 'val_evaluator=None')
RTOL = 1e-4  # the tool's default dense criterion (atol 1e-5 + rtol * max|ref|)


def deploy(*args, expect_ok=True, timeout=600):
    """Run tools/deploy_onnx.py with the deploy venv's python; (returncode, output)."""
    assert osp.isfile(DEPLOY_PY), (f'{DEPLOY_PY} missing: the deploy venv is made by '
                                   f'bash tools/install_deploy.sh (run by tools/run_tests.sh)')
    proc = subprocess.run([DEPLOY_PY, osp.join(REPO, 'tools', 'deploy_onnx.py'),
                           *map(str, args)], cwd=REPO, env=tool_env(), capture_output=True,
                          text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f'deploy_onnx.py failed ({proc.returncode}):\n{out[-4000:]}')
    return proc.returncode, out


def report_of(out_dir) -> dict:
    with open(osp.join(str(out_dir), 'deploy_report.json')) as f:
        return json.load(f)


def assert_dense_ok(diffs):
    assert diffs
    for d in diffs:
        assert d['ok'] and d['max_abs'] <= 1e-5 + RTOL * d['max_ref'], d


def assert_standard_ops(report):
    for name, ops in report['ops'].items():
        assert ops['Conv'] > 0, name
        assert not [op for op in ops if '::' in op or op == 'Einsum'], (name, ops)


def error_lines(out: str):
    return [line for line in out.splitlines() if line.startswith('error:')]


# ------------------------------------------------------------------------------------------------
# fixtures: briefly trained toy models, random-weight R50 checkpoints
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def trained_det(tmp_path_factory):
    work = tmp_path_factory.mktemp('deploy_det')
    run_tool('train.py', DET_CFG, '--work-dir', work, '--cfg-options', 'train_cfg.max_epochs=3',
             'default_hooks.checkpoint.interval=3', *NO_VAL)
    return work, osp.join(str(work), 'epoch_3.pth')


@pytest.fixture(scope='module')
def trained_seg(tmp_path_factory):
    work = tmp_path_factory.mktemp('deploy_seg')
    run_tool('train.py', SEG_CFG, '--work-dir', work, '--cfg-options', 'train_cfg.max_iters=40',
             'default_hooks.checkpoint.interval=40', *NO_VAL)
    return work, osp.join(str(work), 'iter_40.pth')


@pytest.fixture(scope='module')
def det_deploy(trained_det, tmp_path_factory):
    out = tmp_path_factory.mktemp('det_onnx') / 'out'
    _, output = deploy(DET_CFG, trained_det[1], out, '--verify', '--eval', '--runs', '2')
    return out, report_of(out), output


def random_checkpoint(config: str, path, spread_heads: bool = False):
    """A DO-Conv training checkpoint with random D and BN statistics (tests/test_fold_tool.py);
    ``spread_heads``: RPN / RoI classifier weights with std 0.05 / 0.3, so that scores spread
    like a trained model's instead of all sitting near 0.5 / 1/81."""
    from test_fold_tool import randomise, seeded_model, training_checkpoint
    cfg = Config.fromfile(config)
    model = randomise(seeded_model(cfg, 0), 0)  # the same model in every run
    if spread_heads:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            model.rpn_head.rpn_cls.weight.normal_(0, 0.05, generator=g)
            model.roi_head.bbox_head.fc_cls.weight.normal_(0, 0.3, generator=g)
    torch.save(training_checkpoint(model, cfg), str(path))
    return str(path)


# ------------------------------------------------------------------------------------------------
# the deploy environment
# ------------------------------------------------------------------------------------------------
def test_deploy_venv_has_the_pins_and_leaves_the_main_stack_alone():
    assert osp.isfile(DEPLOY_PY), 'run bash tools/install_deploy.sh'
    code = ('import importlib.metadata as md, json; print(json.dumps({n: md.version(n) for n in '
            '("mmdeploy", "onnxruntime", "onnx", "protobuf", "torch", "mmcv", "mmdet", '
            '"mmsegmentation", "mmengine")}))')
    venv = json.loads(subprocess.run([DEPLOY_PY, '-c', code], capture_output=True, text=True,
                                     check=True).stdout)
    assert venv['mmdeploy'] == '1.3.1' and venv['onnx'] == '1.17.0'
    assert venv['protobuf'] == '3.20.2' and venv['onnxruntime'] == '1.23.2'
    import importlib.metadata as md
    for name in ('torch', 'mmcv', 'mmdet', 'mmsegmentation', 'mmengine'):  # shared, not copied
        assert venv[name] == md.version(name), name
    # the main environment has no mmdeploy (installed with onnxruntime into the venv only; a
    # main environment may have an onnxruntime of its own, as the GPU machine's image does) and
    # keeps its own onnx/protobuf
    assert importlib.util.find_spec('mmdeploy') is None
    assert md.version('onnx') != '1.17.0' and md.version('protobuf') != '3.20.2'
    check = subprocess.run([DEPLOY_PY, '-m', 'pip', 'check'], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_export_tool_without_the_deploy_extra_says_how_to_install(tmp_path):
    proc = subprocess.run([sys.executable, osp.join(REPO, 'tools', 'deploy_onnx.py'), DET_CFG,
                           'x.pth', str(tmp_path / 'out')], cwd=REPO, env=tool_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    [line] = error_lines(proc.stderr)
    assert 'mmdeploy' in line and 'tools/install_deploy.sh' in line and '.venv-deploy' in line
    assert not (tmp_path / 'out').exists()


# torch.onnx.export's keyword defaults: 'dynamo' exists from torch 2.5 and is True from 2.9
DYNAMO_BY_DEFAULT = bool((torch.onnx.export.__kwdefaults__ or {}).get('dynamo'))


def test_shim_patches_only_inside_and_restores_everything():
    import torch.onnx.symbolic_opset9 as opset9
    import torch.onnx.utils as onnx_utils
    export = torch.onnx.export
    had_cast = hasattr(opset9, '_cast_Long')
    # mmdeploy hooks its graph passes on this name; torch 2.13 still re-exports it (no shim)
    assert hasattr(onnx_utils, '_model_to_graph')
    has_dynamo_switch = bool(torchscript_export_kwargs())  # asked of torch's own export
    with mmdeploy_export_compat():
        if has_dynamo_switch:
            assert torch.onnx.export.__wrapped__ is export  # the wrapper only adds dynamo=False
        else:  # torch < 2.5: TorchScript is the only exporter, left as it is
            assert torch.onnx.export is export
        assert callable(opset9._cast_Long)
    assert torch.onnx.export is export
    assert hasattr(opset9, '_cast_Long') == had_cast


def test_shim_upsample_is_bit_identical_in_pytorch_and_restored():
    from mmseg.models.utils.wrappers import Upsample
    original = Upsample.forward
    x = torch.randn(1, 4, 7, 10)
    for factor, mode, corners in ((2, 'bilinear', False), (4, 'nearest', None),
                                  (1.5, 'bilinear', False)):
        layer = Upsample(scale_factor=factor, mode=mode, align_corners=corners)
        before = layer(x)
        with mmdeploy_export_compat():
            assert Upsample.forward is not original
            inside = layer(x)
        assert torch.equal(before, inside), factor
    assert Upsample.forward is original


def test_shim_exports_with_the_torchscript_exporter(tmp_path):
    """torch 2.13's default (dynamo=True) needs onnxscript, which the stack does not have; under
    the shim the same call goes to the TorchScript exporter mmdeploy was written for."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    if DYNAMO_BY_DEFAULT and importlib.util.find_spec('onnxscript') is None:
        with pytest.raises(ImportError):
            torch.onnx.export(model, (x, ), str(tmp_path / 'a.onnx'))
    with mmdeploy_export_compat():
        torch.onnx.export(model, (x, ), str(tmp_path / 'b.onnx'), opset_version=11)
    import onnx
    graph = onnx.load(str(tmp_path / 'b.onnx')).graph
    assert [n.op_type for n in graph.node] == ['Conv', 'Relu']


# ------------------------------------------------------------------------------------------------
# toy models, trained: fold -> export -> ONNX Runtime == PyTorch
# ------------------------------------------------------------------------------------------------
def test_toy_retinanet_onnxruntime_matches_pytorch_and_gives_the_same_map(det_deploy):
    out, report, output = det_deploy
    assert report['verify_ok'] and 'PASS' in output
    assert report['folded']['num_folded'] == 24 and report['checkpoint_kind'].startswith(
        'unfolded DO-Conv')
    for name in ('end2end.onnx', 'raw_outputs.onnx', 'deploy_cfg.py', 'epoch_3_folded.pth',
                 'retinanet_r18-tiny-doconv_fpn_toy_deploy.py', 'deploy.json', 'pipeline.json'):
        assert (out / name).is_file(), name
    assert_standard_ops(report)
    assert 'NonMaxSuppression' in report['ops']['end2end.onnx']
    assert_dense_ok(report['fold_verify'])
    cmp = report['comparisons']['input']
    assert_dense_ok(cmp['raw_outputs'])
    assert len(cmp['raw_outputs']) == 6  # cls/reg maps of 3 levels
    for key in ('detections', 'detections_vs_mmdet'):  # RetinaNet: same post-processing as mmdet
        match = cmp[key]
        assert match['ok'] and match['num_ref'] > 0, (key, match)
        assert match['matched'] == match['num_ref'] == match['num_ort'], (key, match)
        assert match['max_score_diff'] <= 1e-4 and match['max_box_diff'] <= 1e-2, (key, match)
    metrics = report['metrics']
    assert metrics['pytorch']['coco/bbox_mAP'] > 0
    assert metrics['onnxruntime'] == metrics['pytorch']  # every COCO number, exactly
    assert report['seconds']['ort_ms_per_image'] > 0 and report['seconds']['export_end2end'] > 0


def test_toy_semantic_fpn_dynamic_export_matches_at_two_shapes_and_same_miou(trained_seg, tmp_path):
    out = tmp_path / 'seg'
    deploy(SEG_CFG, trained_seg[1], out, '--dynamic', '--verify', '--eval', '--runs', '1')
    report = report_of(out)
    metrics = report['metrics']
    assert metrics['pytorch']['mIoU'] > 0 and metrics['onnxruntime'] == metrics['pytorch']
    assert report['verify_ok'] and report['dynamic']
    assert report['deploy_cfg'].endswith('segmentation_onnxruntime_dynamic.py')
    # mmdeploy's SDK meta: it reads the config's top-level data_preprocessor (the toy configs
    # had it only inside the model, and the meta was skipped)
    assert (out / 'deploy.json').is_file() and (out / 'pipeline.json').is_file()
    assert_standard_ops(report)
    shapes = set()
    for key in ('input', 'second_input'):
        cmp = report['comparisons'][key]
        shapes.add(tuple(cmp['shape']))
        assert_dense_ok(cmp['raw_outputs'])
        assert_dense_ok(cmp['seg_logits'])
        assert cmp['seg_labels']['ok'] and cmp['seg_labels']['unexplained'] == 0
    assert len(shapes) == 2  # one ONNX file, two input shapes


def test_verify_failure_exits_nonzero_and_writes_nothing(trained_seg, tmp_path):
    out = tmp_path / 'seg_strict'
    code, output = deploy(SEG_CFG, trained_seg[1], out, '--verify', '--atol', '0', '--rtol',
                          '1e-12', '--runs', '1', expect_ok=False)
    assert code == 1
    [line] = error_lines(output)
    assert 'verify failed' in line and 'nothing was written' in line
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.deploy_onnx_')]


# ------------------------------------------------------------------------------------------------
# shipped R50 configs, random weights
# ------------------------------------------------------------------------------------------------
def test_faster_rcnn_r50_fpn_exports_with_standard_roialign_and_matches(tmp_path):
    ckpt = random_checkpoint(FRCNN, tmp_path / 'frcnn.pth', spread_heads=True)
    out = tmp_path / 'frcnn'
    deploy(FRCNN, ckpt, out, '--verify', '--shape', '128', '128', '--runs', '1')
    report = report_of(out)
    assert report['verify_ok']
    assert_standard_ops(report)
    for name in ('end2end.onnx', 'roi_outputs.onnx'):
        assert 'RoiAlign' in report['ops'][name]  # ONNX's own op, no mmdeploy custom op
    cmp = report['comparisons']['input']
    assert_dense_ok(cmp['raw_outputs'])  # RPN maps, 5 levels
    assert len(cmp['raw_outputs']) == 10
    assert_dense_ok(cmp['roi_outputs'])  # RoI head on the same proposals: cls_score, bbox_pred
    assert cmp['num_rois'] > 100
    match = cmp['detections']  # same post-processing: one to one
    assert match['ok'] and match['num_ref'] > 0 and match['matched'] == match['num_ref'], match
    # mmdet's own RPN runs NMS per level, mmdeploy's over all levels: reported, not asserted
    assert 'detections_vs_mmdet' in cmp
    assert report['deploy_cfg'].endswith('detection_onnxruntime_static.py')
    # opset 16: ONNX RoiAlign's half_pixel mode is mmcv's aligned RoIAlign (at opset 11, RoIs
    # under one feature cell are pooled differently; configs/deploy/detection_*)
    assert report['opset'] == 16


def test_pspnet_r50_d8_exports_and_matches(tmp_path):
    # 96 x 96: the PPM's 1/2/3/6 bins divide the 12 x 12 feature map (see README: otherwise
    # ONNX's AveragePool windows differ from adaptive pooling and --verify fails)
    ckpt = random_checkpoint(PSPNET, tmp_path / 'psp.pth')
    out = tmp_path / 'psp'
    deploy(PSPNET, ckpt, out, '--verify', '--shape', '96', '96', '--runs', '1',
           '--cfg-options', 'norm_cfg.type=BN')
    report = report_of(out)
    assert report['verify_ok']
    assert_standard_ops(report)
    cmp = report['comparisons']['input']
    assert cmp['shape'] == [1, 3, 96, 96]
    assert_dense_ok(cmp['raw_outputs'])
    assert_dense_ok(cmp['seg_logits'])
    assert cmp['seg_labels']['ok']


# ------------------------------------------------------------------------------------------------
# train/deploy mix-ups, in every tool that loads a checkpoint
# ------------------------------------------------------------------------------------------------
def test_guard_refuses_unfolded_checkpoint_with_deploy_config(det_deploy, trained_det, tmp_path):
    out, _, _ = det_deploy
    deploy_cfg = str(out / 'retinanet_r18-tiny-doconv_fpn_toy_deploy.py')
    unfolded, folded = trained_det[1], str(out / 'epoch_3_folded.pth')
    cfg = Config.fromfile(deploy_cfg)

    # the API: load_checkpoint_file(config=...) and check_checkpoint_config
    with pytest.raises(CheckpointError) as error:
        load_checkpoint_file(unfolded, config=deploy_cfg)
    message = str(error.value)
    assert '\n' not in message and 'unfolded DO-Conv training checkpoint' in message
    assert 'tools/fold_doconv.py' in message and '24 layers' in message
    assert load_checkpoint_file(unfolded, config=DET_CFG)['state_dict']
    assert load_checkpoint_file(folded, config=cfg)['meta']['doconv_folded'] is True
    line = check_checkpoint_config(load_checkpoint_file(folded), cfg, folded)
    assert line.startswith('folded DO-Conv checkpoint') and '24 DO-Conv layers folded' in line
    assert 'D = 0' in check_checkpoint_config(load_checkpoint_file(folded),
                                              Config.fromfile(DET_CFG), folded)
    plain = {'state_dict': {'conv.weight': torch.zeros(2, 2, 3, 3)}}
    assert describe_checkpoint(plain).startswith('plain checkpoint')

    def refused(proc_out: str, code: int):
        assert code != 0
        [line] = error_lines(proc_out)
        assert 'unfolded DO-Conv training checkpoint' in line and 'fold_doconv.py' in line

    # tools/test.py and tools/train.py (load_from; a bare --resume from a work dir whose last
    # checkpoint is the unfolded one, which mmengine finds through its last_checkpoint file)
    resume_dir = tmp_path / 'resume'
    resume_dir.mkdir()
    (resume_dir / 'last_checkpoint').write_text(unfolded)
    for tool, args in (('test.py', (deploy_cfg, unfolded, '--work-dir', tmp_path / 'test')),
                       ('train.py', (deploy_cfg, '--cfg-options', f'load_from={unfolded}',
                                     '--work-dir', tmp_path / 'train')),
                       ('train.py', (deploy_cfg, '--resume', '--work-dir', resume_dir))):
        proc = subprocess.run([sys.executable, osp.join(REPO, 'tools', tool),
                               *map(str, args)], cwd=REPO, env=tool_env(),
                              capture_output=True, text=True, timeout=300)
        refused(proc.stderr, proc.returncode)
    # the export tool: refused before anything is written
    code, output = deploy(deploy_cfg, unfolded, tmp_path / 'onnx', expect_ok=False)
    refused(output, code)
    assert not (tmp_path / 'onnx').exists()
    # the fold tool: a deploy config builds no DO-Conv layer, nothing to fold with it
    proc = subprocess.run([sys.executable, osp.join(REPO, 'tools', 'fold_doconv.py'), deploy_cfg,
                           unfolded, str(tmp_path / 'f.pth')], cwd=REPO, env=tool_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    [line] = error_lines(proc.stderr)
    assert 'builds no DO-Conv layer' in line and 'training config' in line
    assert not (tmp_path / 'f.pth').exists()


def test_tools_report_the_fold_marker(det_deploy, trained_det, tmp_path):
    out, _, _ = det_deploy
    deploy_cfg = str(out / 'retinanet_r18-tiny-doconv_fpn_toy_deploy.py')
    folded = str(out / 'epoch_3_folded.pth')
    proc = run_tool('test.py', deploy_cfg, folded, '--work-dir', tmp_path / 'test',
                    '--cfg-options', 'test_dataloader.dataset.indices=2')
    assert 'folded DO-Conv checkpoint (meta["doconv_folded"]: 24 DO-Conv layers folded' in (
        proc.stdout + proc.stderr)
    # the fold tool names the marker when given a folded checkpoint
    fold = subprocess.run([sys.executable, osp.join(REPO, 'tools', 'fold_doconv.py'), DET_CFG,
                           folded, str(tmp_path / 'again.pth')], cwd=REPO, env=tool_env(),
                          capture_output=True, text=True, timeout=300)
    assert fold.returncode == 1 and 'doconv_folded' in fold.stderr
    # the export tool takes the folded pair as it is and reports the marker
    code, output = deploy(deploy_cfg, folded, tmp_path / 'onnx', '--runs', '1')
    report = report_of(tmp_path / 'onnx')
    assert report['checkpoint_kind'].startswith('folded DO-Conv checkpoint')
    assert 'folded' not in report  # not folded again
    assert report['verify_ok']
    # ... and with the training config (as tools/test.py takes it), whose deploy config it makes
    # (it was refused as "already folded")
    code, output = deploy(DET_CFG, folded, tmp_path / 'onnx_train_cfg', '--runs', '1')
    report = report_of(tmp_path / 'onnx_train_cfg')
    assert 'is already folded: exporting it with the deploy config of' in output
    assert 'folded' not in report and report['verify_ok']
    assert (tmp_path / 'onnx_train_cfg' / 'retinanet_r18-tiny-doconv_fpn_toy_deploy.py').is_file()


def test_export_tool_bad_input_one_line_errors(trained_det, det_deploy, tmp_path):
    other_model = tmp_path / 'retinanet_one_stacked_conv.py'  # a plain config of another model
    plain_retinanet = osp.join(REPO, 'configs/toy/retinanet_r18-tiny_fpn_toy.py')
    other_model.write_text(f"_base_ = {plain_retinanet!r}\n"
                           "model = dict(bbox_head=dict(stacked_convs=1))\n")
    cases = [
        ((DET_CFG, tmp_path / 'missing.pth', tmp_path / 'o1'), 'does not exist'),
        ((tmp_path / 'nope.py', trained_det[1], tmp_path / 'o2'), 'CONFIG'),
        ((DET_CFG, trained_det[1], tmp_path / 'o3', '--deploy-cfg',
          osp.join(REPO, 'configs/deploy/segmentation_onnxruntime_static.py')),
         'is for \'mmseg\''),
        # the keys that do not match are named (the message had only torch's first line)
        ((other_model, det_deploy[0] / 'epoch_3_folded.pth', tmp_path / 'o4'),
         'does not strict-load into the model of retinanet_one_stacked_conv.py (unexpected: '
         'bbox_head.cls_convs.1.conv.weight'),
    ]
    for args, needle in cases:
        code, output = deploy(*args, expect_ok=False)
        assert code == 1, output[-2000:]
        [line] = error_lines(output)
        assert needle in line, line
        assert not osp.exists(str(args[2]))
    # An input inside OUT_DIR at a name the export writes (an edited OUT_DIR/deploy_cfg.py passed
    # back as --deploy-cfg) is never replaced.
    out = tmp_path / 'again'
    out.mkdir()
    edited = out / 'deploy_cfg.py'
    edited.write_text((det_deploy[0] / 'deploy_cfg.py').read_text() + '# edited\n')
    before = edited.read_bytes()
    code, output = deploy(DET_CFG, trained_det[1], out, '--deploy-cfg', edited, expect_ok=False)
    assert code == 1, output[-2000:]
    [line] = error_lines(output)
    assert 'would be replaced by this export but it is the input' in line, line
    assert edited.read_bytes() == before and sorted(p.name for p in out.iterdir()) == [
        'deploy_cfg.py']
