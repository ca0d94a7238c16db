"""Pretrain a DO-Conv classifier (mmpretrain), carry its backbone, D included, into the toy DO-Conv
detector and segmentor, train, fold and evaluate them (issue 12).

The classifiers train for 2 epochs on the toy classification set: enough for D to move far from
0 (checked), which is all the transfer needs. Equalities are exact where the same tensors are
copied (checkpoint -> module: torch.equal); metrics before and after folding are compared as the
fold tests do (identical, since outputs agree to ~1e-6 and metrics round far coarser).
"""
import json
import os.path as osp
import subprocess
import sys

import pytest
import torch

pytest.importorskip('mmpretrain', reason='mmpretrain (the pretraining extra) is not installed')

from mmengine.config import Config  # noqa: E402
from mmengine.registry import MODELS, DefaultScope  # noqa: E402

from do_conv_mm import DOConv2d  # noqa: E402
from do_conv_mm.checkpoint import load_checkpoint_file  # noqa: E402
from do_conv_mm.pretrained import (PretrainedMismatchError, backbone_state_dict,  # noqa: E402
                                   check_pretrained_inits, strip_prefix)
from training_helpers import REPO, call_tool, run_tool, tool_env  # noqa: E402

# The tools run as a user runs them where their process is what is checked (training, exit codes
# and error lines); where a test reads their result or their report, through their main() in this
# process (the same code without a second interpreter importing torch, mmdet and mmseg).


def _extract(*args) -> str:
    """tools/extract_backbone.py ARGS in this process; its stdout (it must succeed)."""
    return call_tool('extract_backbone.py', *args)[0]

TOY = osp.join(REPO, 'configs', 'toy')
CLS = osp.join(TOY, 'cls_r18-tiny-doconv_toy.py')
CLS_V1C = osp.join(TOY, 'cls_r18v1c-tiny-doconv_toy.py')
CLS_PLAIN = osp.join(TOY, 'cls_r18-tiny_toy.py')
DET = osp.join(TOY, 'retinanet_r18-tiny-doconv-pretrained_fpn_toy.py')
DET_PLAIN = osp.join(TOY, 'retinanet_r18-tiny_fpn_toy.py')
SEG = osp.join(TOY, 'fpn_r18-tiny-doconv-pretrained_toy.py')
SEG_DOCONV = osp.join(TOY, 'fpn_r18-tiny-doconv_toy.py')


def _train_classifiers(work_dir):
    """Both toy DO-Conv classifiers, 2 epochs each, side by side (one core each)."""
    procs = {}
    for name, config in (('cls', CLS), ('cls_v1c', CLS_V1C)):
        cmd = [sys.executable, osp.join(REPO, 'tools', 'train.py'), config, '--work-dir',
               str(work_dir / name), '--cfg-options', 'train_cfg.max_epochs=2',
               'default_hooks.checkpoint.interval=2']
        procs[name] = subprocess.Popen(cmd, cwd=REPO, env=tool_env(threads=1),
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True)
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-4000:]
    return {name: work_dir / name / 'epoch_2.pth' for name in procs}


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp('pretrain')
    ckpts = _train_classifiers(work_dir)
    ckpts['backbone_v1c'] = work_dir / 'backbone_v1c.pth'
    output = _extract(ckpts['cls_v1c'], ckpts['backbone_v1c'], '--config', SEG)
    assert 'loads completely into the backbone' in output, output
    return ckpts


def _build(config, **cfg_options):
    cfg = Config.fromfile(config)
    cfg.merge_from_dict(cfg_options)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        import importlib
        importlib.import_module(f'{cfg.default_scope}.models')
        return MODELS.build(cfg.model)


def _doconv_d(module):
    return {f'{name}.D': m.D.detach().clone() for name, m in module.named_modules()
            if isinstance(m, DOConv2d) and m.D is not None}


def test_pretrained_d_is_trained_and_moves_exactly_into_detector_and_segmentor(pretrained):
    cls_weights = load_checkpoint_file(pretrained['cls'])['state_dict']
    cls_d = {k: v for k, v in strip_prefix(cls_weights, 'backbone.').items() if k.endswith('.D')}
    assert len(cls_d) == 17  # 7x7 stem + 2 per BasicBlock x 8
    assert max(v.abs().max().item() for v in cls_d.values()) > 1e-2  # D trained away from 0

    detector = _build(DET, **{'model.backbone.init_cfg.checkpoint': str(pretrained['cls'])})
    assert all(torch.count_nonzero(d) == 0 for d in _doconv_d(detector.backbone).values())
    detector.init_weights()  # mmengine's PretrainedInit: the path training takes
    det_d = _doconv_d(detector.backbone)
    assert det_d.keys() == cls_d.keys()
    assert all(torch.equal(det_d[k], cls_d[k]) for k in cls_d)
    assert torch.equal(detector.backbone.layer4[1].conv2.weight,
                       cls_weights['backbone.layer4.1.conv2.weight'])

    v1c_weights = load_checkpoint_file(pretrained['cls_v1c'])['state_dict']
    segmentor = _build(SEG, **{'model.backbone.init_cfg.checkpoint':
                               str(pretrained['backbone_v1c'])})
    segmentor.init_weights()
    seg_d = _doconv_d(segmentor.backbone)
    assert len(seg_d) == 19  # deep stem: 3 convs
    # mmpretrain's stem.N.conv is mmseg's stem.3N.
    for n in range(3):
        assert torch.equal(seg_d[f'stem.{3 * n}.D'], v1c_weights[f'backbone.stem.{n}.conv.D'])
        assert torch.equal(segmentor.backbone.stem[3 * n + 1].running_var,
                           v1c_weights[f'backbone.stem.{n}.bn.running_var'])
    assert torch.equal(seg_d['layer3.0.conv1.D'], v1c_weights['backbone.layer3.0.conv1.D'])


def test_extracted_backbone_loads_strictly_into_mmseg_resnetv1c(pretrained):
    extracted = torch.load(pretrained['backbone_v1c'], weights_only=True)
    assert extracted['meta']['stem_keys_renamed'] == 3 * (2 + 5)  # conv: weight, D; bn: 5
    assert extracted['meta']['doconv_layers'] == 19
    segmentor = _build(SEG_DOCONV)
    result = segmentor.backbone.load_state_dict(extracted['state_dict'], strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def _test_metrics(config, checkpoint, work_dir, *extra):
    """tools/test.py, in this process (its metrics are what is compared, not its process)."""
    call_tool('test.py', config, checkpoint, '--work-dir', work_dir, *extra)
    return json.loads((work_dir / 'test_metrics.json').read_text())['metrics']


@pytest.mark.parametrize('task', ['det', 'seg'])
def test_pretrained_model_trains_folds_and_evaluates_equally(pretrained, tmp_path, task):
    if task == 'det':
        config, start = DET, pretrained['cls']
        schedule = ['train_cfg.max_epochs=2', 'default_hooks.checkpoint.interval=2']
        ckpt_name, n_d, metric = 'epoch_2.pth', 17, 'coco/bbox_mAP'
        extra_test = ['--cfg-options', 'model.test_cfg.score_thr=0.0',
                      'test_dataloader.dataset.indices=12']
    else:
        config, start = SEG, pretrained['backbone_v1c']
        schedule = ['train_cfg.max_iters=30', 'train_cfg.val_interval=30',
                    'default_hooks.checkpoint.interval=30']
        ckpt_name, n_d, metric = 'iter_30.pth', 19, 'mIoU'
        extra_test = ['--cfg-options', 'test_dataloader.dataset.indices=12']
    proc = run_tool('train.py', config, '--work-dir', tmp_path / 'train', '--cfg-options',
                    f'model.backbone.init_cfg.checkpoint={start}', *schedule, timeout=600)
    log = proc.stdout + proc.stderr
    assert f'pretrained: backbone <- {str(start)!r}' in log and f'D of {n_d} DO-Conv' in log
    ckpt = tmp_path / 'train' / ckpt_name
    folded = tmp_path / 'deploy' / 'folded.pth'
    assert 'verify PASS' in call_tool('fold_doconv.py', config, ckpt, folded, '--verify')[0]
    deploy_config = tmp_path / 'deploy' / (osp.splitext(osp.basename(config))[0] + '_deploy.py')
    before = _test_metrics(config, ckpt, tmp_path / 'before', *extra_test)
    after = _test_metrics(deploy_config, folded, tmp_path / 'after', *extra_test)
    assert before == after and metric in before


def test_doconv_checkpoint_into_plain_backbone_stops_training_with_the_keys(pretrained,
                                                                           tmp_path):
    config = tmp_path / 'plain_from_doconv.py'
    config.write_text(f"_base_ = {DET_PLAIN!r}\nmodel = dict(backbone=dict(init_cfg=dict("
                      f"_delete_=True, type='Pretrained', checkpoint={str(pretrained['cls'])!r},"
                      f" prefix='backbone.')))\n")
    proc = subprocess.run([sys.executable, osp.join(REPO, 'tools', 'train.py'), str(config),
                           '--work-dir', str(tmp_path / 'w')], cwd=REPO, env=tool_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and 'Traceback' not in proc.stderr
    assert 'DO-Conv checkpoint (D for 17 conv(s), e.g. conv1.D)' in errors[0]
    assert "conv_cfg=dict(type='DOConv')" in errors[0] and 'fold_doconv.py' in errors[0]
    assert not (tmp_path / 'w' / 'epoch_1.pth').exists()


def test_d_mul_mismatch_is_refused_with_the_d_mul_to_use(pretrained):
    detector = _build(DET, **{'model.backbone.init_cfg.checkpoint': str(pretrained['cls']),
                              'model.backbone.conv_cfg.D_mul': 64})
    with pytest.raises(PretrainedMismatchError, match=r'D_mul 49 vs 64') as error:
        check_pretrained_inits(detector)
    assert "D_mul=49" in str(error.value) and 'backbone' in str(error.value)
    # mmengine's own non-strict load of the same checkpoint names the D_mul too.
    with pytest.raises(RuntimeError, match=r'checkpoint has D_mul=49, this layer D_mul=64'):
        detector.backbone.load_state_dict(
            strip_prefix(load_checkpoint_file(pretrained['cls'])['state_dict'], 'backbone.'))


def test_plain_classifier_checkpoint_loads_as_d_zero(tmp_path):
    torch.manual_seed(0)
    plain = _build(CLS_PLAIN)
    path = tmp_path / 'plain_cls.pth'
    torch.save(dict(state_dict=plain.state_dict(), meta=dict()), path)
    detector = _build(DET, **{'model.backbone.init_cfg.checkpoint': str(path)})
    (line, ) = check_pretrained_inits(detector)
    assert '17 DO-Conv layer(s) start from D = 0' in line
    detector.init_weights()
    assert all(torch.count_nonzero(d) == 0 for d in _doconv_d(detector.backbone).values())
    assert torch.equal(detector.backbone.conv1.weight, plain.backbone.conv1.weight)


def test_other_architecture_is_refused_and_extraction_writes_nothing(pretrained, tmp_path):
    # A ResNet (7x7 conv1) classifier into the ResNetV1c (deep stem) segmentor.
    segmentor = _build(SEG, **{'model.backbone.init_cfg.checkpoint': str(pretrained['cls']),
                               'model.backbone.init_cfg.prefix': 'backbone.'})
    with pytest.raises(PretrainedMismatchError, match=r'lacks 15 weights .*stem\.0\.weight'):
        check_pretrained_inits(segmentor)
    out = tmp_path / 'never.pth'
    proc = subprocess.run([sys.executable, osp.join(REPO, 'tools', 'extract_backbone.py'),
                           str(pretrained['cls']), str(out), '--config', SEG], cwd=REPO,
                          env=tool_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr.startswith('error: ')
    assert 'ResNetV1c has a deep stem' in proc.stderr and not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left either
    # A checkpoint without backbone keys: named, nothing written.
    bare = tmp_path / 'bare.pth'
    torch.save(dict(state_dict=dict(w=torch.zeros(1))), bare)
    with pytest.raises(Exception, match='no keys under'):
        backbone_state_dict(load_checkpoint_file(bare))


def _save_random_d_classifier(name: str, path):
    """configs/mmpretrain/NAME.py built with D ~ N(0, 0.05) everywhere, saved to ``path`` as a
    classifier checkpoint; returns the classifier."""
    classifier = _build(osp.join(REPO, 'configs', 'mmpretrain', f'{name}.py'))
    for module in classifier.modules():
        if isinstance(module, DOConv2d) and module.D is not None:
            torch.nn.init.normal_(module.D, std=0.05)
    torch.save(dict(state_dict=classifier.state_dict(), meta=dict()), path)
    return classifier


def test_model_zoo_path_resnet50_into_faster_rcnn_and_v1c_into_pspnet(tmp_path):
    """The README's ImageNet path on the shipped configs (random weights, no training): the
    mmpretrain R50 DO-Conv checkpoint is accepted whole by Faster R-CNN's backbone (prefix
    backbone.), the V1c-50 one by PSPNet's through tools/extract_backbone.py and
    ``model.pretrained``; mmengine's init then holds the classifier's D."""
    import importlib
    torch.manual_seed(0)
    paths = {}
    for name in ('resnet50-doconv_8xb32_in1k', 'resnetv1c50-doconv_8xb32_in1k'):
        paths[name] = tmp_path / f'{name}.pth'
        _save_random_d_classifier(name, paths[name])
    r50 = load_checkpoint_file(paths['resnet50-doconv_8xb32_in1k'])['state_dict']

    detector = _build(osp.join(REPO, 'configs', 'mmdet', 'faster-rcnn_r50-doconv_fpn_1x_coco.py'),
                      **{'model.backbone.init_cfg.checkpoint': str(paths[
                          'resnet50-doconv_8xb32_in1k']),
                         'model.backbone.init_cfg.prefix': 'backbone.'})
    (line, ) = check_pretrained_inits(detector)
    assert line.startswith('backbone <- ') and 'D of 17 DO-Conv layer(s)' in line
    detector.init_weights()
    assert torch.equal(detector.backbone.layer3[2].conv2.D, r50['backbone.layer3.2.conv2.D'])

    extracted = tmp_path / 'r50v1c_backbone.pth'
    pspnet = osp.join(REPO, 'configs', 'mmseg',
                      'pspnet_r50-d8-doconv_4xb2-80k_cityscapes-512x1024.py')
    _extract(paths['resnetv1c50-doconv_8xb32_in1k'], extracted, '--config', pspnet)
    segmentor = _build(pspnet, **{'model.pretrained': str(extracted)})
    (line, ) = check_pretrained_inits(segmentor)
    assert 'D of 19 DO-Conv layer(s)' in line
    importlib.import_module('mmseg.models')
    segmentor.init_weights()
    v1c = load_checkpoint_file(paths['resnetv1c50-doconv_8xb32_in1k'])['state_dict']
    assert torch.equal(segmentor.backbone.stem[6].D, v1c['backbone.stem.2.conv.D'])
    assert torch.equal(segmentor.backbone.layer4[0].conv2.D, v1c['backbone.layer4.0.conv2.D'])


def test_extract_from_ema_weights_and_bare_state_dicts(tmp_path):
    """mmengine's EMAHook saves the EMA weights as ``state_dict`` and the raw ones as
    ``ema_state_dict`` (``module.`` keys, a ``steps`` counter): the extraction takes
    ``state_dict`` (the EMA weights), --use-ema refuses a checkpoint without EMA; a bare state
    dict (no ``state_dict`` key) works too. (--use-ema took the raw weights before.)"""
    weights = {'backbone.conv1.weight': torch.ones(2, 3, 7, 7),
               'backbone.conv1.D': torch.full((3, 49, 49), 0.5), 'head.fc.weight': torch.ones(4, 2)}
    raw = {f'module.{k}': v * 2 for k, v in weights.items()}
    raw['steps'] = torch.tensor(10)
    for use_ema in (False, True):
        state_dict, renamed = backbone_state_dict(dict(state_dict=weights, ema_state_dict=raw),
                                                  use_ema=use_ema)
        assert renamed == 0 and list(state_dict) == ['conv1.weight', 'conv1.D']
        assert torch.equal(state_dict['conv1.D'], weights['backbone.conv1.D'])  # the EMA weights
    bare, _ = backbone_state_dict(weights)
    assert torch.equal(bare['conv1.D'], weights['backbone.conv1.D'])
    with pytest.raises(Exception, match='has no EMA weights'):
        backbone_state_dict(dict(state_dict=weights), use_ema=True)
    # The CLI: --use-ema, written atomically, meta says which weights.
    path, out = tmp_path / 'ema.pth', tmp_path / 'backbone.pth'
    torch.save(dict(state_dict=weights, ema_state_dict=raw), path)
    assert 'D of 1 DO-Conv layer(s)' in _extract(path, out, '--use-ema')
    saved = torch.load(out, weights_only=True)
    assert saved['meta']['weights'] == 'state_dict (EMA weights)'
    assert torch.equal(saved['state_dict']['conv1.weight'], torch.ones(2, 3, 7, 7))


def test_extract_never_replaces_its_input_or_a_file_it_did_not_write(tmp_path):
    """OUT = CHECKPOINT is refused (the classifier's head and optimizer state would be gone); an
    existing file the tool did not write is kept unless --force; its own output is replaced."""
    path, out, other = tmp_path / 'cls.pth', tmp_path / 'backbone.pth', tmp_path / 'det.pth'
    torch.save(dict(state_dict={'backbone.conv1.weight': torch.ones(2, 3, 7, 7),
                                'head.fc.weight': torch.ones(4, 2)}), path)
    torch.save(dict(state_dict={'neck.conv.weight': torch.ones(1)}), other)
    before = {p: p.read_bytes() for p in (path, other)}
    for target in (path, other):
        proc = subprocess.run([sys.executable, osp.join(REPO, 'tools', 'extract_backbone.py'),
                               str(path), str(target)], cwd=REPO, env=tool_env(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith(
            'error: OUT ')
    assert {p: p.read_bytes() for p in (path, other)} == before
    for args in ((path, out), (path, out), (path, other, '--force')):
        _extract(*args)
    assert 'extracted_from' in torch.load(other, weights_only=True)['meta']


def test_extract_cspnext_keeps_its_stem_and_checks_doconvmodel_conversions(tmp_path):
    """A CSPNeXt classifier (RTMDet's pretraining): its stem is ``stem.N.conv`` in mmdet too, so
    extraction renames nothing (only the ResNet deep stem differs). ``--config`` with a
    DOConvModel config (the toy RTMDet converts CSPNeXt's stem and block conv1 by name): those
    layers are DO-Conv in the check, as in the model that will load OUT, so their D is accepted,
    not reported as dropped into plain convs."""
    from do_conv_mm.deploy import build_model
    rtmdet = osp.join(TOY, 'rtmdet_tiny-doconv_toy.py')
    backbone = build_model(Config.fromfile(rtmdet)).backbone
    by_name = {'backbone.stem.0.conv', 'backbone.stage1.1.blocks.0.conv1.conv'}
    assert all(isinstance(backbone.get_submodule(n[len('backbone.'):]), DOConv2d)
               for n in by_name)
    path, out = tmp_path / 'cls.pth', tmp_path / 'backbone.pth'
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in backbone.state_dict().items()}},
               path)
    output = _extract(path, out, '--config', rtmdet)
    assert f'loads completely into the backbone of {rtmdet}' in output
    assert 'renamed' not in output
    extracted = torch.load(out, weights_only=True)['state_dict']
    assert list(extracted) == list(backbone.state_dict())


def test_model_zoo_path_cspnext_into_rtmdet(tmp_path):
    """RTMDet's own path with DO-Conv (random weights, no training): the mmpretrain CSPNeXt-tiny
    DO-Conv checkpoint goes into RTMDet-tiny's backbone with the base config's prefix, all 15 D
    included (the 7 converted by name on both sides), bit for bit after mmengine's init."""
    torch.manual_seed(0)
    path = tmp_path / 'cspnext.pth'
    classifier = _save_random_d_classifier('cspnext-tiny-doconv_8xb256-rsb-a1-600e_in1k', path)
    detector = _build(osp.join(REPO, 'configs', 'mmdet', 'rtmdet_tiny-doconv_8xb32-300e_coco.py'),
                      **{'model.backbone.init_cfg.checkpoint': str(path)})
    assert detector.backbone.init_cfg['prefix'] == 'backbone.'  # the base config's
    (line, ) = check_pretrained_inits(detector)
    assert line.endswith("221 tensors, D of 15 DO-Conv layer(s)")  # complete, nothing unused
    detector.init_weights()
    loaded = _doconv_d(detector.backbone)
    assert len(loaded) == 15
    expected = _doconv_d(classifier.backbone)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_model_zoo_path_efficientnet_b3_into_retinanet(tmp_path):
    """EfficientNet's path (random weights, no training): the mmpretrain EfficientNet-B3 DO-Conv
    checkpoint (27 DOConvAdaptivePadding layers) goes into the EfficientNet-B3 RetinaNet's
    backbone with the base config's prefix ('backbone', no dot); the classifier's last 1×1 conv
    (layers.6) is reported unused, and every D arrives bit for bit after mmengine's init."""
    torch.manual_seed(0)
    path = tmp_path / 'effb3.pth'
    classifier = _save_random_d_classifier('efficientnet-b3-doconv_8xb32_in1k', path)
    detector = _build(osp.join(REPO, 'configs', 'mmdet',
                               'retinanet_effb3-doconv_fpn_8xb4-crop896-1x_coco.py'),
                      **{'model.backbone.init_cfg.checkpoint': str(path)})
    assert detector.backbone.init_cfg['prefix'] == 'backbone'  # the base config's
    (line, ) = check_pretrained_inits(detector)
    assert 'D of 27 DO-Conv layer(s)' in line and 'layers.6' in line, line
    detector.init_weights()
    loaded = _doconv_d(detector.backbone)
    assert len(loaded) == 27
    expected = _doconv_d(classifier.backbone)
    assert all(torch.equal(loaded[k], expected[k]) for k in loaded)
