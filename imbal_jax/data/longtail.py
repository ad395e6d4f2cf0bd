"""The long-tail protocol: exponential-profile subsampling and stratified splits.

Counts follow Cao et al. (2019), "Learning Imbalanced Datasets with
Label-Distribution-Aware Margin Loss", the protocol behind CIFAR-10/100-LT:
class of rank r (0 = head) keeps int(n_head * ratio ** (-r / (C - 1))) images.
"""

from __future__ import annotations

import numpy as np


def longtail_counts(available: np.ndarray, imbalance_ratio: float,
                    order: str = 'index') -> np.ndarray:
  """Target per-class counts for `imbalance_ratio` = n_head / n_tail.

  `order='index'` ranks classes by their index (the CIFAR-LT convention for
  balanced sources); `order='count'` ranks them by available count, largest
  first (for sources that are imbalanced already). The head class keeps all
  its images; no class gets more than it has.
  """
  available = np.asarray(available, dtype=np.int64)
  if imbalance_ratio < 1:
    raise ValueError(f'config.imbalance_ratio must be >= 1, got {imbalance_ratio}.')
  num_classes = len(available)
  if order == 'index':
    ranking = np.arange(num_classes)
  elif order == 'count':
    ranking = np.argsort(-available, kind='stable')
  else:
    raise ValueError(f"order must be 'index' or 'count', got {order!r}.")
  rank = np.empty(num_classes, dtype=np.int64)
  rank[ranking] = np.arange(num_classes)
  head = available[ranking[0]]
  exponent = rank / max(num_classes - 1, 1)
  targets = (head * imbalance_ratio ** (-exponent)).astype(np.int64)
  return np.minimum(np.maximum(targets, 1), available)


def longtail_indices(labels: np.ndarray, num_classes: int, imbalance_ratio: float,
                     seed: int, order: str = 'index') -> np.ndarray:
  """Sorted indices of a seeded long-tailed subset of `labels`."""
  labels = np.asarray(labels)
  available = np.bincount(labels, minlength=num_classes)
  targets = longtail_counts(available, imbalance_ratio, order)
  rng = np.random.default_rng(seed)
  chosen = []
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    chosen.append(rng.choice(members, size=targets[c], replace=False))
  return np.sort(np.concatenate(chosen))


def balanced_holdout(labels: np.ndarray, num_classes: int, per_class: int,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Splits off `per_class` seeded examples of every class.

  Returns (held_out, rest), both sorted index arrays. Raises if a class has too
  few examples to leave any behind.
  """
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  held = []
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    if len(members) <= per_class:
      raise ValueError(
          f'class {c} has {len(members)} examples; cannot hold out {per_class} of them '
          'and keep some for training. Lower the per-class hold-out.')
    held.append(rng.choice(members, size=per_class, replace=False))
  held = np.sort(np.concatenate(held))
  rest = np.setdiff1d(np.arange(len(labels)), held)
  return held, rest
