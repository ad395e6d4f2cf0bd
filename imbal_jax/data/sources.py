"""Data sources. Each returns a `Dataset`: uint8 NHWC images per split and labels.

Only the embedded scikit-learn digits source lives here for now; it needs no
download (the 1,797 images ship inside scikit-learn).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from imbal_jax.data import longtail

SPLITS = ('train', 'val', 'test')


@dataclasses.dataclass(frozen=True)
class Split:
  images: np.ndarray  # [n, height, width, channels] uint8
  labels: np.ndarray  # [n] int32

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Dataset:
  name: str
  class_names: tuple[str, ...]
  splits: dict[str, Split]
  # Where the training subset came from: indices into the source's training pool.
  train_indices: np.ndarray | None = None

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.splits['train'].images.shape[1:])

  def class_counts(self, split: str) -> np.ndarray:
    return np.bincount(self.splits[split].labels, minlength=self.num_classes)


def load_digits_lt(imbalance_ratio: float, seed: int, val_per_class: int = 20,
                   test_per_class: int = 40, split_seed: int = 0) -> Dataset:
  """scikit-learn's handwritten digits (8x8 grey, 10 classes), long-tailed.

  Validation and test are balanced, disjoint, seeded hold-outs of
  `val_per_class` and `test_per_class` images per class, fixed by `split_seed`
  so that runs with different seeds are scored on the same images; the
  remaining pool is subsampled to `imbalance_ratio` with the exponential
  profile (class 0 head), seeded by `seed`.
  """
  from sklearn.datasets import load_digits

  bunch = load_digits()
  # Pixel values are 0..16; scale to the 0..255 range every other source uses.
  images = np.clip(bunch.images * 16.0, 0, 255).astype(np.uint8)[..., None]
  labels = bunch.target.astype(np.int32)
  num_classes = 10
  test_idx, pool = longtail.balanced_holdout(labels, num_classes, test_per_class, split_seed)
  val_in_pool, train_pool_pos = longtail.balanced_holdout(
      labels[pool], num_classes, val_per_class, split_seed + 1)
  val_idx = pool[val_in_pool]
  train_pool = pool[train_pool_pos]
  chosen = longtail.longtail_indices(labels[train_pool], num_classes, imbalance_ratio,
                                     seed, order='index')
  train_idx = train_pool[chosen]
  splits = {name: Split(images[idx], labels[idx])
            for name, idx in (('train', train_idx), ('val', val_idx), ('test', test_idx))}
  return Dataset(name='digits', class_names=tuple(str(d) for d in range(num_classes)),
                 splits=splits, train_indices=train_idx)


DATASETS = {'digits': load_digits_lt}


def load(config) -> Dataset:
  """The data set named by `config.dataset`, with its long-tail protocol applied."""
  if config.dataset not in DATASETS:
    raise ValueError(
        f'config.dataset={config.dataset!r} is not a known data set; choose one of '
        f'{sorted(DATASETS)}.')
  return DATASETS[config.dataset](imbalance_ratio=config.imbalance_ratio, seed=config.seed)
