"""Two detection sets matched under tolerance (same label, score within ``score_atol``, box
within ``box_atol`` px; unmatched only at a score tie), from mmdet samples or mmdeploy output,
and the one-line verdict.

A detection set is ``dict(bboxes=(N, 4), scores=(N,), labels=(N,))`` of numpy arrays (float64
boxes and scores).
"""
from typing import Any, Dict, Optional

import numpy as np
import torch

__all__ = ['DEFAULT_SCORE_ATOL', 'DEFAULT_BOX_ATOL', 'match_detections', 'sample_detections',
           'mmdeploy_detections', 'match_line']

DEFAULT_SCORE_ATOL = 1e-4
DEFAULT_BOX_ATOL = 1e-2  # pixels


def match_detections(ref: Dict[str, np.ndarray], ort: Dict[str, np.ndarray], score_thr: float,
                     max_per_img: Optional[int], score_atol: float = DEFAULT_SCORE_ATOL,
                     box_atol: float = DEFAULT_BOX_ATOL) -> Dict[str, Any]:
    """Match two detection sets (``bboxes`` (N, 4), ``scores`` (N,), ``labels`` (N,)).

    Greedy by descending reference score: each reference detection takes the unused ORT
    detection of the same label with the closest box among those within ``box_atol`` and
    ``score_atol``. Unmatched detections on either side are allowed only at a tie the runtimes
    may break differently (score within ``score_atol`` of ``score_thr``, or of the lowest kept
    score when ``max_per_img`` detections were kept). Returns the counts, the worst matched
    differences and ``ok``.
    """
    used = np.zeros(len(ort['scores']), dtype=bool)
    worst_box, worst_score, matched = 0.0, 0.0, 0
    unmatched_ref = []
    for i in np.argsort(-ref['scores'], kind='stable'):
        candidates = np.flatnonzero(
            (~used) & (ort['labels'] == ref['labels'][i])
            & (np.abs(ort['scores'] - ref['scores'][i]) <= score_atol)
            & (np.abs(ort['bboxes'] - ref['bboxes'][i]).max(axis=1, initial=0) <= box_atol))
        if len(candidates) == 0:
            unmatched_ref.append(int(i))
            continue
        box_diff = np.abs(ort['bboxes'][candidates] - ref['bboxes'][i]).max(axis=1)
        j = candidates[int(np.argmin(box_diff))]
        used[j] = True
        matched += 1
        worst_box = max(worst_box, float(box_diff.min()))
        worst_score = max(worst_score, float(abs(ort['scores'][j] - ref['scores'][i])))
    unmatched_ort = [int(j) for j in np.flatnonzero(~used)]

    def at_tie(scores: np.ndarray, index: int) -> bool:
        score = float(scores[index])
        if abs(score - score_thr) <= score_atol:
            return True
        full = max_per_img is not None and len(scores) >= max_per_img
        return full and abs(score - float(scores.min())) <= score_atol

    unexplained = ([i for i in unmatched_ref if not at_tie(ref['scores'], i)]
                   + [j for j in unmatched_ort if not at_tie(ort['scores'], j)])
    return dict(num_ref=int(len(ref['scores'])), num_ort=int(len(ort['scores'])),
                matched=matched, unmatched_ref=len(unmatched_ref),
                unmatched_ort=len(unmatched_ort), unexplained=len(unexplained),
                max_box_diff=worst_box, max_score_diff=worst_score,
                score_atol=score_atol, box_atol=box_atol, ok=not unexplained)


def sample_detections(sample) -> Dict[str, np.ndarray]:
    """The detection set of an mmdet DetDataSample's ``pred_instances``."""
    pred = sample.pred_instances
    return dict(bboxes=pred.bboxes.detach().cpu().double().numpy().reshape(-1, 4),
                scores=pred.scores.detach().cpu().double().numpy().reshape(-1),
                labels=pred.labels.detach().cpu().numpy().reshape(-1))


def mmdeploy_detections(dets, labels) -> Dict[str, np.ndarray]:
    """Image 0 of mmdeploy's (dets, labels), without the zero-score rows that pad the output
    (mmdeploy's End2EndModel drops them the same way)."""
    dets = torch.as_tensor(dets).detach().cpu().double()[0]
    labels = torch.as_tensor(labels).detach().cpu()[0]
    keep = dets[:, 4] > 0
    dets, labels = dets[keep], labels[keep]
    return dict(bboxes=dets[:, :4].numpy().reshape(-1, 4), scores=dets[:, 4].numpy().reshape(-1),
                labels=labels.numpy().reshape(-1))


def match_line(match: Dict[str, Any], checked: bool = True) -> str:
    """One report line; ``checked=False``: a comparison that is reported, not a criterion."""
    verdict = ('PASS' if match['ok'] else 'FAIL') if checked else (
        'same' if match['ok'] else 'differ (reported only)')
    return (f'{match["num_ort"]} vs {match["num_ref"]}, {match["matched"]} matched (same label, '
            f'max box diff {match["max_box_diff"]:.2e} px, max score diff '
            f'{match["max_score_diff"]:.2e}); unmatched {match["unmatched_ref"]}/'
            f'{match["unmatched_ort"]}, {match["unexplained"]} not at a score tie -> {verdict}')
