"""Metrics against scikit-learn, and calibration against a plain-Python loop."""

import json
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from imbal_jax import metrics

# scikit-learn's own notes on the edge cases these tests exercise on purpose.
pytestmark = pytest.mark.filterwarnings('ignore::UserWarning:sklearn')


def one_hot(predictions, num_classes):
  return np.eye(num_classes)[predictions]


def random_predictions(seed, num_examples=300, num_classes=6, absent=()):
  """Labels and probabilities that are right more often than chance, with ties."""
  rng = np.random.default_rng(seed)
  classes = np.setdiff1d(np.arange(num_classes), absent)
  # Imbalanced, but every class not in `absent` occurs at least once.
  labels = rng.permutation(np.concatenate([classes, rng.choice(
      classes, size=num_examples - len(classes), p=rng.dirichlet(np.full(len(classes), 2.0)))]))
  logits = rng.normal(size=(num_examples, num_classes)) + 1.5 * one_hot(labels, num_classes)
  probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  # Rounding to 2 decimals makes tied scores, which the ROC AUC must count as half.
  probabilities = np.round(probabilities, 2)
  return labels, probabilities / probabilities.sum(axis=1, keepdims=True)


def summarize_quietly(labels, probabilities, groups='terciles', train_counts=None):
  num_classes = probabilities.shape[1]
  names = [f'c{c}' for c in range(num_classes)]
  counts = train_counts if train_counts is not None else list(range(100, 100 - num_classes, -1))
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    return metrics.summarize(labels, probabilities, names, counts, groups)


def none_to_nan(values):
  return np.array([np.nan if v is None else v for v in values], np.float64)


def check_against_sklearn(labels, probabilities, summary):
  num_classes = probabilities.shape[1]
  predictions = probabilities.argmax(axis=1)
  present = np.unique(labels)
  every = list(range(num_classes))
  np.testing.assert_array_equal(summary['confusion_matrix'],
                                skm.confusion_matrix(labels, predictions, labels=every))
  assert summary['num_examples'] == len(labels)
  assert summary['accuracy'] == pytest.approx(skm.accuracy_score(labels, predictions))
  assert summary['balanced_accuracy'] == pytest.approx(
      skm.balanced_accuracy_score(labels, predictions))
  assert summary['macro_f1'] == pytest.approx(
      skm.f1_score(labels, predictions, labels=present, average='macro'))
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # scikit-learn warns about 0/0, which it returns as NaN here
    for key, reference in (('precision', skm.precision_score), ('recall', skm.recall_score),
                           ('f1', skm.f1_score)):
      expected = reference(labels, predictions, labels=every, average=None,
                           zero_division=np.nan)
      np.testing.assert_allclose(none_to_nan(row[key] for row in summary['per_class']),
                                 expected, err_msg=key)
  binary_aucs = [skm.roc_auc_score(labels == c, probabilities[:, c]) for c in present]
  assert summary['roc_auc_ovr'] == pytest.approx(np.mean(binary_aucs))
  assert summary['mcc'] == pytest.approx(skm.matthews_corrcoef(labels, predictions))
  assert summary['cohen_kappa'] == pytest.approx(
      skm.cohen_kappa_score(labels, predictions, labels=every))
  assert summary['quadratic_kappa'] == pytest.approx(
      skm.cohen_kappa_score(labels, predictions, labels=every, weights='quadratic'))


@pytest.mark.parametrize('seed', range(5))
def test_summary_matches_sklearn(seed):
  labels, probabilities = random_predictions(seed)
  summary = summarize_quietly(labels, probabilities)
  check_against_sklearn(labels, probabilities, summary)
  # With every class present, scikit-learn's own multi-class call applies.
  assert summary['roc_auc_ovr'] == pytest.approx(
      skm.roc_auc_score(labels, probabilities, multi_class='ovr', average='macro'))
  assert summary['absent_classes'] == []
  # Plain Python values only, and no NaN: report.json must be strict JSON.
  assert json.loads(json.dumps(summary, allow_nan=False)) == summary


@pytest.mark.parametrize('seed', range(3))
def test_float32_probabilities_match_sklearn(seed):
  labels, probabilities = random_predictions(seed)
  probabilities = probabilities.astype(np.float32)
  summary = summarize_quietly(labels, probabilities)
  assert summary['roc_auc_ovr'] == pytest.approx(
      skm.roc_auc_score(labels, probabilities, multi_class='ovr'))
  assert summary['ece'] == pytest.approx(slow_ece(labels, probabilities))


@pytest.mark.parametrize('seed', range(3))
def test_absent_class_matches_sklearn_and_warns_once(seed):
  labels, probabilities = random_predictions(seed, absent=(2, 4))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    summary = metrics.summarize(labels, probabilities, [f'c{c}' for c in range(6)], [50] * 6)
  assert len(caught) == 1 and "['c2', 'c4']" in str(caught[0].message)
  assert summary['absent_classes'] == ['c2', 'c4']
  assert summary['per_class'][2]['recall'] is None and summary['per_class'][4]['recall'] is None
  assert json.loads(json.dumps(summary, allow_nan=False)) == summary
  check_against_sklearn(labels, probabilities, summary)


def test_absent_class_predicted_and_present_class_never_predicted():
  labels = np.array([0, 0, 1, 1, 1, 3])  # class 2 absent from the labels
  predictions = np.array([0, 2, 1, 1, 0, 0])  # class 3 never predicted
  with pytest.warns(UserWarning, match=r"\['c'\]"):
    summary = metrics.summarize(labels, one_hot(predictions, 4), list('abcd'), [1] * 4)
  check_against_sklearn(labels, one_hot(predictions, 4), summary)
  absent, never_predicted = summary['per_class'][2], summary['per_class'][3]
  assert absent['recall'] is None and absent['precision'] == 0.0 and absent['f1'] == 0.0
  assert never_predicted['precision'] is None and never_predicted['recall'] == 0.0
  assert summary['macro_f1'] == pytest.approx((2 / 5 + 4 / 5 + 0.0) / 3)  # a, b, d


def test_single_class_split():
  labels = np.array([1, 1, 1, 1])
  all_right = one_hot(np.array([1, 1, 1, 1]), 3)
  summary = summarize_quietly(labels, all_right)
  assert summary['accuracy'] == summary['balanced_accuracy'] == summary['macro_f1'] == 1.0
  # Undefined: no negatives for the ROC curve; no variance for MCC; chance agreement is 1.
  assert summary['roc_auc_ovr'] is None
  assert summary['mcc'] is None and skm.matthews_corrcoef(labels, labels) == 0.0
  assert summary['cohen_kappa'] is None and summary['quadratic_kappa'] is None
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    assert np.isnan(skm.cohen_kappa_score(labels, labels, labels=[0, 1, 2]))

  predictions = np.array([1, 0, 1, 2])
  summary = summarize_quietly(labels, one_hot(predictions, 3))
  assert summary['balanced_accuracy'] == pytest.approx(0.5)
  assert summary['mcc'] is None  # scikit-learn says 0 by convention
  assert summary['cohen_kappa'] == pytest.approx(
      skm.cohen_kappa_score(labels, predictions, labels=[0, 1, 2]))
  assert summary['quadratic_kappa'] == pytest.approx(
      skm.cohen_kappa_score(labels, predictions, labels=[0, 1, 2], weights='quadratic'))


def test_predictions_collapsed_onto_one_class_give_mcc_and_kappa_0():
  # The labels vary, every prediction is the head class: no correlation, as scikit-learn
  # and Cohen's kappa have it (a collapsed seed must count in a mean, not drop out).
  labels = np.array([0, 0, 0, 1, 2, 2])
  collapsed = np.zeros_like(labels)
  summary = summarize_quietly(labels, one_hot(collapsed, 3))
  assert summary['mcc'] == 0.0 == skm.matthews_corrcoef(labels, collapsed)
  assert summary['cohen_kappa'] == pytest.approx(
      skm.cohen_kappa_score(labels, collapsed, labels=[0, 1, 2])) == 0.0


def test_two_classes_present_gives_a_binary_auc():
  labels = np.array([0, 0, 3, 3, 3])
  probabilities = np.array([[.7, .1, .1, .1], [.2, .1, .1, .6], [.1, .1, .1, .7],
                            [.4, .2, .2, .2], [.1, .2, .1, .6]])
  auc = summarize_quietly(labels, probabilities)['roc_auc_ovr']
  expected = np.mean([skm.roc_auc_score(labels == 0, probabilities[:, 0]),
                      skm.roc_auc_score(labels == 3, probabilities[:, 3])])
  assert auc == pytest.approx(expected)


def test_empty_split_and_bad_shapes_raise():
  with pytest.raises(ValueError, match='empty split'):
    metrics.summarize(np.zeros(0, np.int64), np.zeros((0, 3)), list('abc'), [1, 2, 3])
  with pytest.raises(ValueError, match=r'probabilities \[n, 3\]'):
    metrics.summarize(np.zeros(4, np.int64), np.zeros((4, 2)), list('abc'), [1, 2, 3])
  with pytest.raises(ValueError, match='training counts'):
    metrics.summarize(np.zeros(4, np.int64), np.full((4, 3), 1 / 3), list('abc'), [1, 2])
  with pytest.raises(ValueError, match=r'\[0, 3\)'):
    metrics.summarize(np.array([0, 3]), np.full((2, 3), 1 / 3), list('abc'), [1, 2, 3])


def slow_bins(labels, probabilities, num_bins=15):
  """The definition, one example at a time: bin m holds confidences in (m/M, (m+1)/M]."""
  rows = []
  for m in range(num_bins):
    low, high = m / num_bins, (m + 1) / num_bins
    confidences, hits = [], []
    for label, row in zip(labels, probabilities):
      row = [float(p) for p in row]
      confidence = max(row)
      if low < confidence <= high or (m == 0 and confidence == 0.0):
        confidences.append(confidence)
        hits.append(1.0 if row.index(confidence) == label else 0.0)
    rows.append((len(hits), sum(confidences) / len(hits) if hits else None,
                 sum(hits) / len(hits) if hits else None))
  return rows


def slow_ece(labels, probabilities, num_bins=15):
  total = 0.0
  for count, confidence, accuracy in slow_bins(labels, probabilities, num_bins):
    if count:
      total += count / len(labels) * abs(accuracy - confidence)
  return total


@pytest.mark.parametrize('seed', range(4))
@pytest.mark.parametrize('num_bins', [15, 7])
def test_calibration_matches_a_slow_loop(seed, num_bins):
  labels, probabilities = random_predictions(seed, num_examples=200, num_classes=4)
  # Confidences exactly on bin edges (k / num_bins) must fall in the lower bin.
  edge = np.array([[3 / num_bins, 1 - 3 / num_bins, 0, 0], [1.0, 0, 0, 0]])
  labels = np.concatenate([labels, [0, 1]])
  probabilities = np.concatenate([probabilities, edge])
  bins = metrics.calibration_bins(labels, probabilities, num_bins)
  expected = slow_bins(labels, probabilities, num_bins)
  assert bins['count'] == [row[0] for row in expected]
  assert sum(bins['count']) == len(labels)
  np.testing.assert_allclose(none_to_nan(bins['confidence']), none_to_nan(r[1] for r in expected))
  np.testing.assert_allclose(none_to_nan(bins['accuracy']), none_to_nan(r[2] for r in expected))
  np.testing.assert_allclose(bins['edges'], np.linspace(0, 1, num_bins + 1))
  assert metrics.expected_calibration_error(labels, probabilities, num_bins) == pytest.approx(
      slow_ece(labels, probabilities, num_bins))


def test_ece_of_a_known_case():
  # Two examples at confidence 0.9 (one right), two at 0.6 (both right): |0.5-0.9|/2 + |1-0.6|/2.
  probabilities = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
  labels = np.array([0, 1, 1, 1])
  assert metrics.expected_calibration_error(labels, probabilities) == pytest.approx(0.4)


@pytest.mark.parametrize('counts, sizes', [
    (list(range(10, 0, -1)), (3, 4, 3)),
    (list(range(7)), (2, 3, 2)),
    (list(range(8)), (3, 2, 3)),
    ([5, 9, 1, 7, 3, 8], (2, 2, 2)),
    ([4, 1], (1, 0, 1)),
])
def test_terciles_sort_by_training_count(counts, sizes):
  groups = metrics.frequency_groups(counts)
  assert tuple(len(groups[name]) for name in metrics.GROUP_NAMES) == sizes
  ranked = sorted(range(len(counts)), key=lambda c: (-counts[c], c))
  head, medium = sizes[0], sizes[0] + sizes[1]
  assert groups['head'].tolist() == sorted(ranked[:head])
  assert groups['medium'].tolist() == sorted(ranked[head:medium])
  assert groups['tail'].tolist() == sorted(ranked[medium:])


def test_terciles_break_ties_by_class_index():
  groups = metrics.frequency_groups([5, 5, 5, 5, 5, 5])
  assert [groups[name].tolist() for name in metrics.GROUP_NAMES] == [[0, 1], [2, 3], [4, 5]]


def test_oltr_thresholds():
  groups = metrics.frequency_groups([500, 101, 100, 20, 19, 5, 60], metrics.OLTR_THRESHOLDS)
  assert groups['head'].tolist() == [0, 1]  # > 100
  assert groups['medium'].tolist() == [2, 3, 6]  # 20..100, both ends included
  assert groups['tail'].tolist() == [4, 5]  # < 20
  with pytest.raises(ValueError, match='low must not exceed high'):
    metrics.frequency_groups([1, 2], (20, 100))
  with pytest.raises(ValueError, match='thresholds'):
    metrics.frequency_groups([1, 2], 'quartiles')
  with pytest.raises(ValueError, match='thresholds'):
    metrics.frequency_groups([1, 2], (1, 2, 3))


@pytest.mark.parametrize('seed', range(3))
def test_group_metrics(seed):
  labels, probabilities = random_predictions(seed, num_examples=400, num_classes=9, absent=(8,))
  counts = [300, 20, 150, 5, 90, 40, 120, 8, 2]  # head: 0, 6, 2; medium: 4, 5, 1; tail: 7, 3, 8
  summary = summarize_quietly(labels, probabilities, train_counts=counts)
  predictions = probabilities.argmax(axis=1)
  names = {'head': [0, 2, 6], 'medium': [1, 4, 5], 'tail': [3, 7, 8]}
  for name, members in names.items():
    group = summary['groups'][name]
    assert group['classes'] == [f'c{c}' for c in members]
    present = [c for c in members if c != 8]  # class 8 is absent: left out, not counted as 0
    assert group['accuracy'] == pytest.approx(
        skm.recall_score(labels, predictions, labels=present, average='macro'))
    in_group = np.isin(labels, members)
    assert group['num_examples'] == in_group.sum()
    assert group['ece'] == pytest.approx(slow_ece(labels[in_group], probabilities[in_group]))
  assert summary['ece'] == pytest.approx(slow_ece(labels, probabilities))
  assert summary['group_rule'] == 'terciles'


def test_empty_group_is_none_not_zero():
  labels, probabilities = random_predictions(0, num_classes=3)
  summary = summarize_quietly(labels, probabilities, groups=(100, 20), train_counts=[500, 300, 50])
  assert summary['groups']['tail'] == {'classes': [], 'num_examples': 0, 'accuracy': None,
                                       'ece': None}
  assert summary['groups']['head']['classes'] == ['c0', 'c1']
  assert summary['group_rule'] == 'train count: head > 100, medium 20..100, tail < 20'


def test_group_whose_classes_are_all_absent_is_none():
  labels = np.array([0, 0, 1, 1])
  summary = summarize_quietly(labels, one_hot(labels, 3), train_counts=[10, 5, 1])
  assert summary['groups']['tail'] == {'classes': ['c2'], 'num_examples': 0, 'accuracy': None,
                                       'ece': None}
  assert summary['groups']['head']['accuracy'] == 1.0


def test_quadratic_kappa_uses_class_index_distance():
  # Class 2 is absent everywhere, yet 1 <-> 3 is still two grades apart; scikit-learn
  # without `labels` would weigh it as one (it indexes only the labels it sees).
  labels, predictions = np.array([3, 1, 1, 0, 0, 0]), np.array([0, 0, 0, 3, 1, 3])
  confusion = metrics.confusion_matrix(labels, predictions, 4)
  kappa = metrics.cohen_kappa(confusion, 'quadratic')
  assert kappa == pytest.approx(
      skm.cohen_kappa_score(labels, predictions, labels=range(4), weights='quadratic'))
  assert kappa != pytest.approx(skm.cohen_kappa_score(labels, predictions, weights='quadratic'))
  with pytest.raises(ValueError, match='quadratic'):
    metrics.cohen_kappa(confusion, 'linear')
