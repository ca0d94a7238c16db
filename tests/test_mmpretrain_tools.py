"""The tools on mmpretrain configs: analyze_doconv.py, fold_doconv.py --verify, test.py --out /
--show-dir, train.py --amp; and the mmpretrain parts our configs use under numpy 2.

The toy DO-Conv classifier (configs/toy/cls_r18-tiny-doconv_toy.py) runs on 8 + 8 generated
64-px images (batch 4) in a temporary directory. Its checkpoint is the freshly built model with
random non-zero D and BN statistics (no training needed to exercise folding). train.py and the
test.py whose log is read run as subprocesses, as a user runs them; fold_doconv.py and the
test.py runs whose outputs are compared run through their ``main()`` in this process (the same
code, without a second interpreter importing torch and mmpretrain).
"""
import json
import os
import os.path as osp
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn

pytest.importorskip('mmpretrain')

from mmengine.config import Config  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402

from do_conv_mm import DOConv2d, load_checkpoint_file  # noqa: E402
from do_conv_mm.toy_cls_data import CLS_CLASSES, generate_toy_cls_data  # noqa: E402
from test_configs import (EXTRA_SUFFIXES, _build, _config_path, _kxk_convs,  # noqa: E402,F401
                          analyze_tool, check_analysis_total)
from training_helpers import REPO, call_tool, run_tool, train_losses  # noqa: E402

TOY_CLS = _config_path('toy/cls_r18-tiny-doconv_toy.py')
R18 = _config_path('mmpretrain/resnet18-doconv_8xb32_in1k.py')


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    """dict(root=toy data, config=the toy DO-Conv classifier on it, checkpoint=random-D one)."""
    directory = tmp_path_factory.mktemp('cls')
    root = generate_toy_cls_data(str(directory / 'data'), num_train=8, num_val=8, img_size=64)
    config = directory / 'tiny_cls.py'
    config.write_text(f"""_base_ = {TOY_CLS!r}
toy_cls_data_root = {root!r}
train_dataloader = dict(batch_size=4, dataset=dict(data_root=toy_cls_data_root))
val_dataloader = dict(batch_size=4, dataset=dict(data_root=toy_cls_data_root))
test_dataloader = dict(batch_size=4, dataset=dict(data_root=toy_cls_data_root))
param_scheduler = []
log_processor = dict(window_size=1)
default_hooks = dict(logger=dict(interval=1))
""")
    cfg = Config.fromfile(str(config))
    torch.manual_seed(0)
    model = _build(cfg)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, DOConv2d) and m.D is not None:
                m.D.normal_(0, 0.1, generator=generator)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=generator)
                m.running_var.uniform_(0.5, 1.5, generator=generator)
    checkpoint = str(directory / 'doconv.pth')
    torch.save(dict(state_dict=model.state_dict(),
                    meta=dict(dataset_meta=dict(classes=list(CLS_CLASSES)))), checkpoint)
    val_images = sorted(osp.join(root, 'val', c, f) for c in CLS_CLASSES
                        for f in os.listdir(osp.join(root, 'val', c)))
    return dict(root=root, config=str(config), checkpoint=checkpoint, dir=directory,
                val_images=val_images)


@pytest.fixture(scope='module')
def folded(toy):
    """tools/fold_doconv.py --verify on the toy checkpoint: (stdout, folded .pth, deploy cfg)."""
    out = str(toy['dir'] / 'deploy' / 'folded.pth')
    stdout, stderr = call_tool('fold_doconv.py', toy['config'], toy['checkpoint'], out,
                               '--verify')
    return stdout + stderr, out, str(toy['dir'] / 'deploy' / 'tiny_cls_deploy.py')


# ----------------------------------------------------------------------------------------------
# analyze_doconv.py
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('config,n_doconv', [(R18, 17), (TOY_CLS, 17)],
                         ids=['resnet18-doconv', 'cls_r18-tiny-doconv_toy'])
def test_analyze_tool_counts_classifier_coverage(config, n_doconv, capsys, analyze_tool):
    capsys.readouterr()
    analyze_tool.main([config, '--shape', '64', '64', '--json'])  # default --mode loss
    result = json.loads(capsys.readouterr().out)
    assert (result['model'], result['task'], result['mode']) == ('ImageClassifier', 'cls', 'loss')
    total = result['total']
    model = _build(Config.fromfile(config)).eval()
    check_analysis_total(total, model, n_doconv)
    assert result['not_run'] == []
    assert result['components']['backbone']['doconv_kxk'] == n_doconv


def test_analyze_tool_classifier_default_shape(analyze_tool):
    """The test pipeline's CenterCrop (ImageNet recipes: 224), a fixed Resize (w, h), else 224."""
    assert analyze_tool.default_shape(Config.fromfile(R18), 'cls') == (224, 224)
    cfg = Config.fromfile(TOY_CLS)  # LoadImageFromFile + PackInputs: no size in the pipeline
    assert analyze_tool.default_shape(cfg, 'cls') == (224, 224)
    cfg.test_dataloader.dataset.pipeline.insert(1, dict(type='Resize', scale=(96, 64)))
    assert analyze_tool.default_shape(cfg, 'cls') == (64, 96)
    batch = analyze_tool._cls_batch(None, 64, 96)
    assert batch[0].gt_label.tolist() == [0] and batch[0].img_shape == (64, 96)


# ----------------------------------------------------------------------------------------------
# fold_doconv.py --verify
# ----------------------------------------------------------------------------------------------
def test_fold_tool_folds_and_verifies_toy_classifier(toy, folded):
    output, out, deploy_config = folded
    assert 'verify PASS' in output and 'folded 17 DOConv layers' in output
    assert 'feat[0]' in output and 'head ' in output  # neck features and logits compared
    code = [line for line in open(deploy_config) if not line.startswith('#')]  # past its mark
    assert not [line for line in code if 'DOConv' in line or 'do_conv_mm' in line]
    state_dict = load_checkpoint_file(out)['state_dict']
    assert not [k for k in state_dict if k.endswith(EXTRA_SUFFIXES)]
    trained = torch.load(toy['checkpoint'], weights_only=True)['state_dict']
    assert not torch.equal(state_dict['backbone.conv1.weight'], trained['backbone.conv1.weight'])
    deploy = _build(Config.fromfile(deploy_config))
    assert not _kxk_convs(deploy)[0] and len(_kxk_convs(deploy)[1]) == 17
    deploy.load_state_dict(state_dict)  # strict


def test_folded_classifier_predicts_what_the_doconv_one_predicts(toy, folded):
    """mmpretrain's own inferencer on the toy val images: the DO-Conv pair (training config,
    unfolded checkpoint) and the deploy pair give the same labels and scores."""
    from mmpretrain.apis import ImageClassificationInferencer
    _, out, deploy_config = folded
    images = toy['val_images']
    results = []
    for config, checkpoint in ((toy['config'], toy['checkpoint']), (deploy_config, out)):
        inferencer = ImageClassificationInferencer(config, pretrained=checkpoint, device='cpu')
        results.append(inferencer(images, batch_size=4))
    doconv, deployed = results
    assert len(doconv) == len(images) == 8
    for a, b in zip(doconv, deployed):
        assert a['pred_label'] == b['pred_label'] and a['pred_class'] == b['pred_class']
        np.testing.assert_allclose(b['pred_scores'], a['pred_scores'], rtol=1e-4, atol=1e-6)
    # With D ~ 0.1 the DO-Conv model is not its plain weights: the fold is what makes them equal.
    plain = _build(Config.fromfile(deploy_config)).eval()
    trained = torch.load(toy['checkpoint'], weights_only=True)['state_dict']
    plain.load_state_dict({k: v for k, v in trained.items() if not k.endswith(EXTRA_SUFFIXES)})
    inferencer = ImageClassificationInferencer(deploy_config, device='cpu')
    inferencer.model = plain
    unfolded_weights = inferencer(images, batch_size=4)
    assert max(abs(np.asarray(a['pred_scores']) - u['pred_scores']).max()
               for a, u in zip(doconv, unfolded_weights)) > 1e-3


def test_fold_verify_on_an_image_through_the_test_pipeline(toy, tmp_path):
    from do_conv_mm import fold_checkpoint
    result = fold_checkpoint(toy['config'], toy['checkpoint'], str(tmp_path / 'f.pth'),
                             verify=True, image=toy['val_images'][0])
    assert result.num_folded == 17
    assert [d.name for d in result.verify] == ['feat[0]', 'head']
    assert all(d.ok for d in result.verify) and result.verify[1].shape == (1, 4)


# ----------------------------------------------------------------------------------------------
# test.py and train.py
# ----------------------------------------------------------------------------------------------
def _test_run(config, checkpoint, work_dir, *extra):
    call_tool('test.py', config, checkpoint, '--work-dir', work_dir, *extra)
    with open(osp.join(work_dir, 'test_metrics.json')) as f:
        return json.load(f)['metrics']


def test_test_tool_evaluates_dumps_and_draws_classifier(toy, folded, tmp_path):
    """Accuracy from the config's evaluator; --out dumps one dict per sample (mmpretrain's
    DumpResults format); --show-dir draws every sample; the deploy pair dumps the same."""
    pkl, vis = str(tmp_path / 'preds.pkl'), str(tmp_path / 'vis')
    metrics = _test_run(toy['config'], toy['checkpoint'], str(tmp_path / 'w1'), '--out', pkl,
                        '--show-dir', vis)
    with open(pkl, 'rb') as f:
        dumped = pickle.load(f)
    assert len(dumped) == 8 and {'pred_label', 'pred_score', 'gt_label'} <= set(dumped[0])
    correct = [int(d['pred_label']) == int(d['gt_label']) for d in dumped]
    assert metrics == {'accuracy/top1': pytest.approx(100 * sum(correct) / len(correct))}
    assert sorted(os.listdir(vis)) == sorted(
        f'{osp.basename(p)}_0.png' for p in toy['val_images'])
    _, out, deploy_config = folded
    pkl2 = str(tmp_path / 'preds_deploy.pkl')
    assert _test_run(deploy_config, out, str(tmp_path / 'w2'), '--out', pkl2) == metrics
    with open(pkl2, 'rb') as f:
        deployed = pickle.load(f)
    for a, b in zip(dumped, deployed):
        assert torch.equal(a['pred_label'], b['pred_label'])
        torch.testing.assert_close(b['pred_score'], a['pred_score'], rtol=1e-4, atol=1e-6)


def test_test_tool_tta_averages_flipped_scores_as_mmpretrains_tool(toy, tmp_path):
    """--tta on a classifier config without tta_model / tta_pipeline: mmpretrain's tool default
    (AverageClsScoreTTA over flip and no flip), with a warning; every sample is predicted, with
    scores that still sum to 1 and differ from the plain test's."""
    plain_pkl, tta_pkl = str(tmp_path / 'plain.pkl'), str(tmp_path / 'tta.pkl')
    _test_run(toy['config'], toy['checkpoint'], str(tmp_path / 'plain'), '--out', plain_pkl)
    proc = run_tool('test.py', toy['config'], toy['checkpoint'], '--work-dir',
                    str(tmp_path / 'tta'), '--tta', '--out', tta_pkl, threads=1)
    assert "using mmpretrain's tools/test.py default" in proc.stdout + proc.stderr
    with open(plain_pkl, 'rb') as f:
        plain = pickle.load(f)
    with open(tta_pkl, 'rb') as f:
        tta = pickle.load(f)
    assert len(tta) == len(plain) == 8
    assert any(not torch.allclose(a['pred_score'], b['pred_score']) for a, b in zip(plain, tta))
    for sample in tta:
        assert torch.isclose(sample['pred_score'].sum(), torch.tensor(1.0), atol=1e-5)


def test_test_tool_out_must_be_a_pickle_for_classifiers(toy):
    import importlib.util
    spec = importlib.util.spec_from_file_location('test_tool', osp.join(REPO, 'tools', 'test.py'))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    cfg = Config.fromfile(toy['config'])
    tool.request_output(cfg, 'preds.pkl')
    with pytest.raises(tool.ToolError, match=r"--out 'preds\.json': the dump file must end in "
                                             r"\.pkl or \.pickle"):
        tool.request_output(cfg, 'preds.json')


def test_train_tool_trains_toy_classifier_one_epoch_with_amp(toy, tmp_path):
    """1 epoch (2 iterations) + validation, bf16 autocast on CPU: D leaves zero and stays fp32."""
    work_dir = str(tmp_path / 'work')
    proc = run_tool('train.py', toy['config'], '--work-dir', work_dir, '--amp', '--cfg-options',
                    'train_cfg.max_epochs=1', 'train_cfg.val_interval=1', threads=2)
    assert 'bfloat16 CPU autocast' in proc.stdout + proc.stderr
    losses = train_losses(work_dir)
    assert len(losses) == 2 and all(np.isfinite(v) for _, v in losses)
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        assert f.read().strip().endswith('epoch_1.pth')
    state_dict = load_checkpoint_file(osp.join(work_dir, 'epoch_1.pth'))['state_dict']
    d_keys = [k for k in state_dict if k.endswith('.D')]
    assert len(d_keys) == 17 and all(state_dict[k].dtype == torch.float32 for k in d_keys)
    assert all(torch.count_nonzero(state_dict[k]) > 0 for k in d_keys)
    assert 'accuracy/top1' in (proc.stdout + proc.stderr)


# ----------------------------------------------------------------------------------------------
# numpy 2: what our configs use works; the known breakage is where the note says
# ----------------------------------------------------------------------------------------------
def test_mmpretrain_parts_our_configs_use_work_under_this_numpy(toy):
    """Our configs' datasets (CustomDataset, ImageNet) with their loading transforms
    (LoadImageFromFile, RandomResizedCrop, RandomFlip, ResizeEdge, CenterCrop, PackInputs, cv2
    and pillow backends), ClsDataPreprocessor + ImageClassifier predict, and the Accuracy /
    SingleLabelMetric evaluators, checked against hand-computed values (run with numpy 2.4.6)."""
    from mmengine.evaluator import Evaluator
    from mmpretrain.registry import DATASETS
    from mmpretrain.structures import DataSample
    recipes = [Config.fromfile(_config_path(f'mmpretrain/{name}'))
               for name in ('resnet50-doconv_8xb32_in1k.py', 'mobilenet-v2-doconv_8xb32_in1k.py')]
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        for cfg in recipes:  # ImageNet, cv2 (R50) and pillow (MobileNetV2) resize backends
            for loader in (cfg.train_dataloader, cfg.test_dataloader):
                dataset = DATASETS.build(dict(loader.dataset, data_root=toy['root'],
                                              classes=CLS_CLASSES))
                assert type(dataset).__name__ == 'ImageNet' and len(dataset) == 8
                item = dataset[5]
                assert item['inputs'].shape == (3, 224, 224)
                assert item['inputs'].dtype == torch.uint8
                sample = item['data_samples']  # toy image N has label N % 4, in that folder
                label = int(osp.basename(sample.img_path)[:6]) % 4
                assert sample.gt_label.tolist() == [label]
                assert osp.basename(osp.dirname(sample.img_path)) == CLS_CLASSES[label]
        toy_cfg = Config.fromfile(toy['config'])
        dataset = DATASETS.build(toy_cfg.test_dataloader.dataset)  # CustomDataset, 64 px
        batch = [dataset[i] for i in range(8)]
        assert batch[3]['inputs'].shape == (3, 64, 64)
        model = _build(toy_cfg).eval()
        with torch.no_grad():
            preds = model.test_step(dict(inputs=[b['inputs'] for b in batch],
                                         data_samples=[b['data_samples'] for b in batch]))
        assert [p.pred_label.item() for p in preds] == [
            int(p.pred_score.argmax()) for p in preds]
        # Metrics on known predictions: 4 classes, 6 samples.
        scores = torch.tensor([[.7, .1, .1, .1], [.1, .6, .2, .1], [.1, .2, .6, .1],
                               [.3, .2, .1, .4], [.5, .1, .3, .1], [.2, .5, .2, .1]])
        labels = [0, 1, 2, 3, 2, 3]  # correct: 0, 1, 2, 3 -> top-1 4/6
        samples = [DataSample().set_pred_score(s).set_gt_label(y).to_dict()
                   for s, y in zip(scores, labels)]
        evaluator = Evaluator([dict(type='Accuracy', topk=(1, 2)),
                               dict(type='SingleLabelMetric', num_classes=4)])
        evaluator.process(samples)
        metrics = evaluator.evaluate(len(samples))
    assert metrics['accuracy/top1'] == pytest.approx(100 * 4 / 6)
    assert metrics['accuracy/top2'] == pytest.approx(100 * 5 / 6)  # sample 4: 2nd is class 2
    # Per class (precision, recall): 0: (1/2, 1), 1: (1/2, 1), 2: (1, 1/2), 3: (1, 1/2).
    precision, recall = np.array([.5, .5, 1, 1]), np.array([1, 1, .5, .5])
    f1 = 2 * precision * recall / (precision + recall)
    assert metrics['single-label/precision'] == pytest.approx(100 * precision.mean())
    assert metrics['single-label/recall'] == pytest.approx(100 * recall.mean())
    assert metrics['single-label/f1-score'] == pytest.approx(100 * f1.mean())


def test_known_numpy_breakage_is_in_retrieval_metrics_only():
    """docs note: mmpretrain 1.2.0's retrieval metrics call np.in1d, which numpy 2.4 removed;
    none of our configs use them. If this fails, mmpretrain or numpy changed: update the note."""
    from mmpretrain.evaluation import RetrievalAveragePrecision, RetrievalRecall
    pred, target = torch.tensor([[0.9, 0.1, 0.5]]), torch.tensor([[1, 0, 0]])  # one-hot
    if hasattr(np, 'in1d'):
        assert RetrievalRecall.calculate(pred, target, topk=1)[0] == 100
        return
    with pytest.raises(AttributeError, match='in1d'):
        RetrievalRecall.calculate(pred, target, topk=1)
    with pytest.raises(AttributeError, match='in1d'):
        RetrievalAveragePrecision.calculate(pred, target, topk=2)
