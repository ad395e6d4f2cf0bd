"""Metrics against scikit-learn on random predictions."""

import numpy as np
import pytest
from sklearn import metrics as skm

from imbal_jax import metrics


def one_hot(predictions, num_classes):
  return np.eye(num_classes)[predictions]


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_summary_matches_sklearn(seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 5, size=200)
  predictions = np.where(rng.random(200) < 0.6, labels, rng.integers(0, 5, size=200))
  summary = metrics.summarize(labels, one_hot(predictions, 5), [str(c) for c in range(5)], [9] * 5)
  np.testing.assert_array_equal(summary['confusion_matrix'],
                                skm.confusion_matrix(labels, predictions, labels=range(5)))
  assert summary['accuracy'] == pytest.approx(skm.accuracy_score(labels, predictions))
  assert summary['balanced_accuracy'] == pytest.approx(
      skm.balanced_accuracy_score(labels, predictions))
  assert summary['macro_f1'] == pytest.approx(skm.f1_score(labels, predictions, average='macro'))
  recall = skm.recall_score(labels, predictions, average=None, labels=range(5))
  np.testing.assert_allclose([row['recall'] for row in summary['per_class']], recall)


def test_absent_class_and_never_predicted_class():
  labels = np.array([0, 0, 1, 1, 1, 3])  # class 2 absent from the labels
  predictions = np.array([0, 2, 1, 1, 0, 0])  # class 3 never predicted
  summary = metrics.summarize(labels, one_hot(predictions, 4), list('abcd'), [1] * 4)
  assert summary['balanced_accuracy'] == pytest.approx(
      skm.balanced_accuracy_score(labels, predictions))
  assert summary['macro_f1'] == pytest.approx(
      skm.f1_score(labels, predictions, average='macro', zero_division=0))
