"""Evaluation metrics, computed once on the host from every real example's
label and class probabilities (padding rows are removed before this point).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """[classes, classes] counts: row = true class, column = predicted class."""
  flat = np.asarray(labels, np.int64) * num_classes + np.asarray(predictions, np.int64)
  return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
  return np.divide(numerator, denominator, out=np.zeros_like(numerator, dtype=np.float64),
                   where=denominator > 0)


def summarize(labels: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str],
              train_counts: Sequence[int]) -> dict:
  """accuracy, balanced accuracy, macro-F1 and a per-class table.

  Balanced accuracy is the mean recall over classes present in the split (as
  scikit-learn's balanced_accuracy_score); macro-F1 averages over every class
  that is present or predicted, with F1 = 0 where undefined (scikit-learn's
  zero_division=0 on the union of labels).
  """
  num_classes = len(class_names)
  confusion = confusion_matrix(labels, np.argmax(probabilities, axis=-1), num_classes)
  support = confusion.sum(axis=1)
  predicted = confusion.sum(axis=0)
  correct = np.diag(confusion)
  recall = _safe_divide(correct, support)
  precision = _safe_divide(correct, predicted)
  f1 = _safe_divide(2 * precision * recall, precision + recall)
  present = support > 0
  seen = present | (predicted > 0)
  total = support.sum()
  per_class = [
      {'class': name, 'train_count': int(train_counts[c]), 'support': int(support[c]),
       'precision': float(precision[c]), 'recall': float(recall[c]), 'f1': float(f1[c])}
      for c, name in enumerate(class_names)
  ]
  return {
      'num_examples': int(total),
      'accuracy': float(correct.sum() / total) if total else 0.0,
      'balanced_accuracy': float(recall[present].mean()) if present.any() else 0.0,
      'macro_f1': float(f1[seen].mean()) if seen.any() else 0.0,
      'per_class': per_class,
      'confusion_matrix': confusion.tolist(),
  }
