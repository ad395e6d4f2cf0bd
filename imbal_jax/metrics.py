"""Evaluation metrics, computed once on the host from every real example's
label and class probabilities (padding rows are removed before this point).

Two conventions keep a rare class from silently scoring 0:
- A value that is undefined (0/0) is None, never 0 or NaN: the recall of a
  class absent from the split, the accuracy of a group with no classes, MCC
  when every label is one class, kappa when chance agreement is already
  perfect. JSON writes null and the tables print '—'.
- Macro averages (balanced accuracy, macro-F1, ROC AUC) run over the classes
  PRESENT in the split: a class with no examples has no recall to average.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

GROUP_NAMES = ('head', 'medium', 'tail')
NUM_CALIBRATION_BINS = 15
# Liu et al. 2019 (OLTR): many-shot > 100 training images, few-shot < 20.
OLTR_THRESHOLDS = (100, 20)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """[classes, classes] counts: row = true class, column = predicted class."""
  flat = np.asarray(labels, np.int64) * num_classes + np.asarray(predictions, np.int64)
  return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _ratios(numerator: np.ndarray, denominator: np.ndarray) -> list[float | None]:
  return [float(n / d) if d > 0 else None for n, d in zip(numerator, denominator)]


def _mean_or_none(values) -> float | None:
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else None


def matthews_corrcoef(confusion: np.ndarray) -> float | None:
  """Multi-class MCC (Gorodkin 2004) from a confusion matrix; None when undefined.

  Undefined when all labels fall in one class (scikit-learn returns 0 there).
  When the labels vary but every prediction is one class (a model collapsed onto
  one class), it is 0, as Cohen's kappa is and as scikit-learn has it: such a
  run's MCC must count in a mean over seeds, not drop out of it.
  """
  confusion = np.asarray(confusion, np.float64)
  total, correct = confusion.sum(), np.trace(confusion)
  true_counts, predicted_counts = confusion.sum(axis=1), confusion.sum(axis=0)
  label_spread = total**2 - true_counts @ true_counts
  prediction_spread = total**2 - predicted_counts @ predicted_counts
  if label_spread <= 0:
    return None
  if prediction_spread <= 0:
    return 0.0
  return float((correct * total - true_counts @ predicted_counts)
               / np.sqrt(prediction_spread * label_spread))


def cohen_kappa(confusion: np.ndarray, weights: str | None = None) -> float | None:
  """Cohen's kappa of predictions vs labels; None when undefined.

  weights='quadratic' penalises a confusion by the squared distance between
  class INDICES, which is meaningful only for ordinal classes (disease
  grades). Undefined when chance agreement is already perfect (one class
  everywhere); scikit-learn returns NaN there.
  """
  confusion = np.asarray(confusion, np.float64)
  num_classes = confusion.shape[0]
  expected = np.outer(confusion.sum(axis=1), confusion.sum(axis=0)) / confusion.sum()
  if weights is None:
    disagreement = 1.0 - np.eye(num_classes)
  elif weights == 'quadratic':
    index = np.arange(num_classes)
    disagreement = (index[:, None] - index[None, :]).astype(np.float64)**2
  else:
    raise ValueError(f"weights={weights!r}: use None or 'quadratic'")
  expected_disagreement = np.sum(disagreement * expected)
  if expected_disagreement <= 0:
    return None
  return float(1.0 - np.sum(disagreement * confusion) / expected_disagreement)


def _average_ranks(values: np.ndarray) -> np.ndarray:
  """1-based ranks, ties sharing their mean rank (what the AUC's U statistic needs)."""
  _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
  last_rank = np.cumsum(counts)
  return (last_rank - (counts - 1) / 2.0)[inverse]


def roc_auc_ovr(labels: np.ndarray, probabilities: np.ndarray) -> float | None:
  """Macro one-vs-rest ROC AUC over the classes present in `labels`.

  Each present class's AUC is the Mann-Whitney U statistic of its own
  probability column (positives: its examples; negatives: all others), ties
  counted as half. None with fewer than two classes present.
  """
  labels = np.asarray(labels)
  present = np.unique(labels)
  if len(present) < 2:
    return None
  areas = []
  for c in present:
    positive = labels == c
    num_positive, num_negative = positive.sum(), (~positive).sum()
    ranks = _average_ranks(np.asarray(probabilities[:, c], np.float64))
    areas.append((ranks[positive].sum() - num_positive * (num_positive + 1) / 2.0) /
                 (num_positive * num_negative))
  return float(np.mean(areas))


def calibration_bins(labels: np.ndarray, probabilities: np.ndarray,
                     num_bins: int = NUM_CALIBRATION_BINS) -> dict:
  """Top-1 confidence vs accuracy in `num_bins` equal-width bins over [0, 1].

  Bin m holds confidences in (m / num_bins, (m + 1) / num_bins] (Guo et al.
  2017). Returns lists (JSON-ready): `edges` [num_bins + 1], and per bin
  `count`, mean `confidence` and `accuracy` (None in an empty bin).
  """
  labels = np.asarray(labels)
  probabilities = np.asarray(probabilities, np.float64)
  confidence = probabilities.max(axis=-1)
  correct = (probabilities.argmax(axis=-1) == labels).astype(np.float64)
  # m / num_bins, each edge rounded once, so an exact boundary lands where the
  # definition says and not one bin over through accumulated rounding.
  edges = np.arange(num_bins + 1) / num_bins
  # The clip keeps a confidence of exactly 0 in the first bin and a float32
  # softmax that rounds a hair above 1 in the last.
  index = np.clip(np.searchsorted(edges, confidence, side='left') - 1, 0, num_bins - 1)
  count = np.bincount(index, minlength=num_bins)
  return {
      'edges': edges.tolist(),
      'count': count.tolist(),
      'confidence': _ratios(np.bincount(index, confidence, minlength=num_bins), count),
      'accuracy': _ratios(np.bincount(index, correct, minlength=num_bins), count),
  }


def ece_from_bins(bins: dict) -> float | None:
  """Expected calibration error: mean |accuracy - confidence| over bins,
  weighted by bin size; None for no examples."""
  total = sum(bins['count'])
  if total == 0:
    return None
  return float(sum(n * abs(a - c) for n, a, c in
                   zip(bins['count'], bins['accuracy'], bins['confidence']) if n) / total)


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray,
                               num_bins: int = NUM_CALIBRATION_BINS) -> float | None:
  return ece_from_bins(calibration_bins(labels, probabilities, num_bins))


def frequency_groups(train_counts: Sequence[int],
                     groups: str | tuple[float, float] = 'terciles') -> dict[str, np.ndarray]:
  """Class indices of the head, medium and tail groups, from TRAINING counts.

  'terciles': classes sorted by training count (ties by class index) cut into
  three nearly equal parts, head = most frequent. A single extra class goes to
  the medium group and two extras to head and tail, so head and tail always
  have the same size (10 classes: 3 / 4 / 3; 7 classes: 2 / 3 / 2).
  (high, low): head = count > high, medium = low <= count <= high, tail =
  count < low; OLTR_THRESHOLDS gives the many / medium / few-shot split of
  Liu et al. (2019). A group may be empty.
  """
  counts = np.asarray(train_counts, np.int64)
  if isinstance(groups, str):
    if groups != 'terciles':
      raise ValueError(f"groups={groups!r}: use 'terciles' or (high, low) count thresholds")
    order = np.argsort(-counts, kind='stable')
    third, extra = divmod(len(counts), 3)
    sizes = [third + (extra == 2), third + (extra == 1)]
    parts = np.split(order, np.cumsum(sizes))
  else:
    try:
      high, low = groups
    except (TypeError, ValueError):
      raise ValueError(f'groups={groups!r}: use (high, low) count thresholds, '
                       "e.g. (100, 20), or 'terciles'") from None
    if not low <= high:
      raise ValueError(f'groups=(high={high}, low={low}): low must not exceed high')
    parts = [np.flatnonzero(counts > high), np.flatnonzero((counts >= low) & (counts <= high)),
             np.flatnonzero(counts < low)]
  return {name: np.sort(part) for name, part in zip(GROUP_NAMES, parts)}


def _group_rule(groups) -> str:
  if isinstance(groups, str):
    return groups
  high, low = groups
  return f'train count: head > {high}, medium {low}..{high}, tail < {low}'


def _checked(labels, probabilities, class_names, train_counts) -> tuple[np.ndarray, np.ndarray]:
  labels, probabilities = np.asarray(labels), np.asarray(probabilities)
  num_classes = len(class_names)
  if labels.ndim != 1 or probabilities.shape != (len(labels), num_classes):
    raise ValueError(f'summarize needs labels [n] and probabilities [n, {num_classes}]; got '
                     f'shapes {labels.shape} and {probabilities.shape}')
  if len(train_counts) != num_classes:
    raise ValueError(f'{len(train_counts)} training counts for {num_classes} classes')
  if len(labels) == 0:
    raise ValueError('summarize got an empty split (0 examples): no metric is defined; '
                     'check that the split was loaded and is not filtered away')
  if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or (
      labels.max() >= num_classes):
    raise ValueError(f'labels must be integers in [0, {num_classes}); got {labels.dtype} in '
                     f'[{labels.min()}, {labels.max()}]')
  return labels, probabilities


def summarize(labels: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str],
              train_counts: Sequence[int], groups: str | tuple[float, float] = 'terciles') -> dict:
  """Every metric of one split, JSON-ready.

  Args:
    labels: [n] true classes of every real example of the split.
    probabilities: [n, classes] predicted class probabilities (rows sum to 1).
    class_names: one name per class.
    train_counts: training images per class; they define the frequency groups.
    groups: 'terciles' or (high, low) thresholds; see `frequency_groups`.

  Returns a dict: num_examples, accuracy, balanced_accuracy (mean recall over
  classes present), macro_f1 (over classes present), roc_auc_ovr, mcc,
  cohen_kappa, quadratic_kappa, ece (15 bins), absent_classes, group_rule,
  groups (head / medium / tail: classes, num_examples, accuracy = mean recall
  over the group's classes present, ece), per_class (class, train_count,
  support, precision, recall, f1) and confusion_matrix (row = true class).
  Warns once naming any class absent from the split.
  """
  labels, probabilities = _checked(labels, probabilities, class_names, train_counts)
  num_classes = len(class_names)
  confusion = confusion_matrix(labels, probabilities.argmax(axis=-1), num_classes)
  support, predicted, correct = confusion.sum(axis=1), confusion.sum(axis=0), np.diag(confusion)
  present = support > 0
  absent_classes = [class_names[c] for c in np.flatnonzero(~present)]
  if absent_classes:
    warnings.warn(f'classes absent from this split: {absent_classes}; their recall is '
                  'undefined (None) and they are left out of balanced accuracy and the '
                  'macro averages', stacklevel=2)
  recall = _ratios(correct, support)
  precision = _ratios(correct, predicted)
  f1 = _ratios(2 * correct, support + predicted)  # 2TP / (2TP + FP + FN)

  class_groups = frequency_groups(train_counts, groups)
  group_summaries = {}
  for name, members in class_groups.items():
    in_group = np.isin(labels, members)
    group_summaries[name] = {
        'classes': [class_names[c] for c in members],
        'num_examples': int(in_group.sum()),
        'accuracy': _mean_or_none(recall[c] for c in members),
        'ece': (expected_calibration_error(labels[in_group], probabilities[in_group])
                if in_group.any() else None),
    }
  per_class = [
      {'class': name, 'train_count': int(train_counts[c]), 'support': int(support[c]),
       'precision': precision[c], 'recall': recall[c], 'f1': f1[c]}
      for c, name in enumerate(class_names)
  ]
  return {
      'num_examples': len(labels),
      'accuracy': float(correct.sum() / len(labels)),
      'balanced_accuracy': _mean_or_none(recall),
      'macro_f1': _mean_or_none(f1[c] for c in np.flatnonzero(present)),
      'roc_auc_ovr': roc_auc_ovr(labels, probabilities),
      'mcc': matthews_corrcoef(confusion),
      'cohen_kappa': cohen_kappa(confusion),
      'quadratic_kappa': cohen_kappa(confusion, 'quadratic'),
      'ece': expected_calibration_error(labels, probabilities),
      'absent_classes': absent_classes,
      'group_rule': _group_rule(groups),
      'groups': group_summaries,
      'per_class': per_class,
      'confusion_matrix': confusion.tolist(),
  }
