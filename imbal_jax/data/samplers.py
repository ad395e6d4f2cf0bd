"""Which training examples each epoch visits.

Every sampler is a pure function of (seed, epoch): a resumed run recomputes
exactly the indices it would have seen, so no iterator state is needed.

- `instance`: every example once per epoch, shuffled (class c drawn with
  probability n_c / N).
- `sqrt`: class c with probability proportional to sqrt(n_c).
- `class_balanced`: every class with probability 1 / C (Kang et al. 2020, cRT).
- `progressive`: (1 - t) * instance + t * class_balanced with t = epoch /
  num_epochs (Kang et al. 2020, "progressively-balanced" sampling).

Within a class, examples are taken from a fresh seeded permutation of the
class, cycled as often as needed, so rare classes repeat evenly rather than
at random.

Batch composition (`pairs=True`, config.batch_pairs, stage 1): half of each
batch is drawn by the sampler; each of those examples is followed by another
example of its class, so every class in a batch appears at least twice and
every anchor of the contrastive loss has a positive besides itself. Class
frequencies stay those of the sampler. A class with a single training image
is paired with itself (its two augmentations differ).
"""

from __future__ import annotations

import numpy as np

SAMPLERS = ('instance', 'sqrt', 'class_balanced', 'progressive')


def class_probabilities(class_counts: np.ndarray, sampler: str, epoch: int = 0,
                        num_epochs: int = 1) -> np.ndarray:
  """The probability of drawing each class under `sampler` at `epoch`."""
  counts = np.asarray(class_counts, dtype=np.float64)
  present = (counts > 0).astype(np.float64)
  instance = counts / counts.sum()
  balanced = present / present.sum()
  if sampler == 'instance':
    return instance
  if sampler == 'sqrt':
    root = np.sqrt(counts)
    return root / root.sum()
  if sampler == 'class_balanced':
    return balanced
  if sampler == 'progressive':
    t = epoch / max(num_epochs, 1)
    return (1.0 - t) * instance + t * balanced
  raise ValueError(f'config.sampler={sampler!r} is not known; choose one of {SAMPLERS}.')


def epoch_indices(labels: np.ndarray, num_classes: int, sampler: str, seed: int, epoch: int,
                  length: int, num_epochs: int = 1, pairs: bool = False) -> np.ndarray:
  """`length` indices into `labels` for `epoch` (deterministic in seed, epoch).

  With `pairs`, `length` must be even: positions 2i and 2i+1 hold two examples
  of one class (distinct where the class has more than one).
  """
  labels = np.asarray(labels)
  if pairs:
    if length % 2:
      raise ValueError(f'pairs need an even number of slots, got {length}.')
    anchors = epoch_indices(labels, num_classes, sampler, seed, epoch, length // 2, num_epochs)
    return _interleave(anchors, _partners(labels, anchors, np.random.default_rng([seed, epoch, 1])))
  rng = np.random.default_rng([seed, epoch])
  if sampler == 'instance':
    # Whole shuffled passes; a partial pass tops up the last batch.
    passes = -(-length // len(labels))
    return np.concatenate([rng.permutation(len(labels)) for _ in range(passes)])[:length]
  counts = np.bincount(labels, minlength=num_classes)
  probabilities = class_probabilities(counts, sampler, epoch, num_epochs)
  drawn_classes = rng.choice(num_classes, size=length, p=probabilities)
  indices = np.empty(length, dtype=np.int64)
  for c in np.unique(drawn_classes):
    members = np.flatnonzero(labels == c)
    slots = np.flatnonzero(drawn_classes == c)
    cycles = -(-len(slots) // len(members))
    stream = np.concatenate([rng.permutation(members) for _ in range(cycles)])
    indices[slots] = stream[:len(slots)]
  return indices


def _partners(labels: np.ndarray, anchors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """For each anchor, another example of its class (itself if the class has one)."""
  partners = np.empty_like(anchors)
  anchor_labels = labels[anchors]
  for c in np.unique(anchor_labels):
    members = np.flatnonzero(labels == c)
    slots = np.flatnonzero(anchor_labels == c)
    if len(members) == 1:
      partners[slots] = members[0]
      continue
    # A uniformly drawn member other than the anchor: draw among the other
    # len(members) - 1 positions and skip over the anchor's own.
    own = np.searchsorted(members, anchors[slots])
    offset = rng.integers(0, len(members) - 1, size=len(slots))
    partners[slots] = members[offset + (offset >= own)]
  return partners


def _interleave(first: np.ndarray, second: np.ndarray) -> np.ndarray:
  out = np.empty(2 * len(first), dtype=first.dtype)
  out[0::2], out[1::2] = first, second
  return out
