"""Data sets: read a source, then apply the split and long-tail protocol.

A reader (see readers.py) returns a `Source`: uint8 NHWC images and int labels
per part as distributed ('train' always; 'val' and 'test' where the data set
defines them), with class names from the data or its metadata. `build`
then makes the three splits the training loop uses:

1. parts the source lacks are carved out by a seeded stratified split
   (`split_seed`, fixed across runs so every seed is scored on the same images);
2. the training split is subsampled to `imbalance_ratio` with the exponential
   profile (longtail.py), seeded by `seed`; `imbalance_ratio=None` keeps the
   distribution as it is;
3. every split must have every class in training and no split may be empty.

The chosen indices (`Dataset.spec`) are written to the workdir and reused on
resume and by stage 2, so a run always sees exactly the same images. They are
row positions in the source's parts, so the source's fingerprint (each part's
image count and a hash of its labels in order) is saved with them, and a source
that no longer matches it is refused instead of silently giving other images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
from typing import Any

import numpy as np

from imbal_jax.data import longtail

SPLITS = ('train', 'val', 'test')


class DataError(ValueError):
  """Data that cannot be used as it is; the message names the file or field and the fix."""


@dataclasses.dataclass(frozen=True)
class Split:
  """Images and labels of one split. `images` may be a memory map: `take` gathers rows."""

  images: Any  # [n_source, height, width, channels] uint8 array or memmap
  labels: np.ndarray  # [n] int32, already restricted to `index`
  index: np.ndarray | None = None  # rows of `images` in this split (None: all, in order)

  def __len__(self) -> int:
    return len(self.labels)

  def take(self, rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows)
    return np.asarray(self.images[rows if self.index is None else self.index[rows]])

  def subset(self, rows: np.ndarray) -> 'Split':
    rows = np.asarray(rows, np.int64)
    index = rows if self.index is None else self.index[rows]
    return Split(self.images, self.labels[rows], index)

  @property
  def image_shape(self) -> tuple[int, ...]:
    return tuple(self.images.shape[1:])

  def __reduce__(self):
    # grain's worker processes receive the training split pickled. A memory-mapped
    # .npy (a `prepare`d cache) would pickle as a full in-memory copy, gigabytes per
    # worker at 224 px; it travels as its path instead and is mapped again there.
    images = self.images
    path = getattr(images, 'filename', None)
    if isinstance(images, np.memmap) and path and str(path).endswith('.npy'):
      return (_split_from_npy, (str(path), images.shape, images.dtype.str, self.labels,
                                self.index))
    return (Split, (images, self.labels, self.index))


def _split_from_npy(path: str, shape, dtype: str, labels, index) -> Split:
  images = np.load(path, mmap_mode='r')
  if images.shape != tuple(shape) or images.dtype.str != dtype:
    raise DataError(f'{path} changed while the run was reading it: it holds {images.dtype} '
                    f'{images.shape}, not {dtype} {tuple(shape)}. Do not rewrite a cache '
                    'in use; rerun the `prepare` command, then start a fresh workdir.')
  return Split(images, labels, index)


@dataclasses.dataclass(frozen=True)
class Source:
  name: str
  class_names: tuple[str, ...]
  parts: dict[str, Split]
  # Balanced sources rank classes by index for the long-tail profile (the CIFAR-LT
  # convention); naturally imbalanced ones by their count.
  balanced: bool = False
  notes: tuple[str, ...] = ()
  # Optional group of each image of the 'train' part (e.g. ISIC's lesion_id): carved
  # splits keep a group's images together, so no lesion is in both train and test.
  groups: np.ndarray | None = None
  # Optional file of each image of the 'train' part (image-file readers and their
  # prepared caches): eval_predictions.csv names the images it scored.
  paths: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class Dataset:
  name: str
  class_names: tuple[str, ...]
  splits: dict[str, Split]
  # split -> {'part': source part, 'rows': indices into that part}
  spec: dict[str, dict[str, Any]]
  notes: tuple[str, ...] = ()
  # source_fingerprint(source) of the source the splits index into
  fingerprint: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
  # split -> the file of each of its images, where the source knows them
  paths: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return self.splits['train'].image_shape

  def class_counts(self, split: str) -> np.ndarray:
    return np.bincount(self.splits[split].labels, minlength=self.num_classes)


def stratified_split(labels: np.ndarray, num_classes: int, fraction: float, seed: int,
                     what: str, groups: np.ndarray | None = None,
                     class_names: tuple[str, ...] | None = None, after: str = ''
                     ) -> tuple[np.ndarray, np.ndarray]:
  """(held_out, rest): `fraction` of each class (at least one image), seeded.

  With `groups` (one id per image), whole groups are held out, class by class, until
  the class's share is reached: a group's images never straddle the two. `class_names`
  and `after` (the split carved before this one, if any) only word the errors.
  """
  left = f' left after the {after} split' if after else ''
  rng = np.random.default_rng(seed)

  def name(c):
    return f'class {c}' if class_names is None else f'class {class_names[c]!r}'

  if groups is not None:
    return _grouped_split(labels, num_classes, fraction, rng, what, np.asarray(groups), name,
                          left)
  held = []
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    if len(members) == 0:
      continue
    take = max(1, int(round(fraction * len(members))))
    if take >= len(members):
      raise DataError(
          f'{name(c)} has only {len(members)} image(s){left}: too few to split off a {what} '
          f'split and keep some for training. Add images of that class or remove it.')
    held.append(rng.choice(members, size=take, replace=False))
  held = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
  return held, np.setdiff1d(np.arange(len(labels)), held)


def _grouped_split(labels, num_classes, fraction, rng, what, groups, name, left):
  ids, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
  group_labels = np.asarray(labels)[first]
  mixed = np.unique(inverse[labels != group_labels[inverse]])
  if len(mixed):
    raise DataError(f'group {str(ids[mixed[0]])!r} holds images of different classes '
                    f'({len(mixed)} such group(s)); a group (lesion) must have one diagnosis. '
                    'Fix the groups file or the labels.')
  sizes = np.bincount(inverse, minlength=len(ids))
  held_groups = []
  for c in range(num_classes):
    members = np.flatnonzero(group_labels == c)
    if len(members) == 0:
      continue
    target = max(1, int(round(fraction * sizes[members].sum())))
    order = rng.permutation(members)
    # The fewest groups, in a seeded order, whose images reach the target.
    count = int(np.searchsorted(np.cumsum(sizes[order]), target)) + 1
    if count >= len(members):
      raise DataError(
          f'{name(c)} has only {len(members)} group(s) ({sizes[members].sum()} images){left}: '
          f'too few to split off a {what} split by group and keep some for training. Add '
          'images of that class or remove it.')
    held_groups.append(order[:count])
  held_groups = np.concatenate(held_groups) if held_groups else np.zeros(0, np.int64)
  held = np.flatnonzero(np.isin(inverse, held_groups))
  return held, np.setdiff1d(np.arange(len(labels)), held)


# The readers that decode image files and resize them to config.image_size.
RESIZING_READERS = ('folder', 'csv', 'isic')


def make_spec(source: Source, imbalance_ratio: float | None, seed: int, split_seed: int,
              val_fraction: float, test_fraction: float) -> dict[str, dict[str, Any]]:
  """Which rows of which source part make each split."""
  num_classes = len(source.class_names)
  train_labels = source.parts['train'].labels
  pool = np.arange(len(train_labels))
  spec, carved = {}, ''
  for split, fraction, salt in (('test', test_fraction, 1), ('val', val_fraction, 2)):
    if split in source.parts:
      spec[split] = {'part': split, 'rows': np.arange(len(source.parts[split]))}
    else:
      held, rest = stratified_split(
          train_labels[pool], num_classes, fraction, split_seed * 1000 + salt, split,
          None if source.groups is None else source.groups[pool], source.class_names,
          after=carved)
      carved = split
      spec[split] = {'part': 'train', 'rows': pool[held]}
      pool = pool[rest]
  if imbalance_ratio is not None:
    order = 'index' if source.balanced else 'count'
    chosen = longtail.longtail_indices(train_labels[pool], num_classes, imbalance_ratio, seed,
                                       order=order)
    pool = pool[chosen]
  spec['train'] = {'part': 'train', 'rows': pool}
  return {split: spec[split] for split in SPLITS}


def check_splits_before_decoding(config, labels, class_names, groups=None) -> None:
  """The split checks of make_spec on the labels alone, for readers that decode image files.

  Carving the val and test splits needs only the labels (and groups), so a class too
  small to split is refused before minutes of decoding. Only where the run will carve
  splits itself (a training config; `prepare` reads without one). A run resuming a
  saved split passes too: its labels and split fields are those the split was made
  with. The checks after decoding stay, since images left out as corrupt change the
  counts.
  """
  if 'test_fraction' not in config:
    return
  labels = np.asarray(labels, np.int32)
  placeholder = Split(np.zeros((len(labels), 0, 0, 0), np.uint8), labels)
  source = Source('labels', tuple(class_names), {'train': placeholder},
                  groups=None if groups is None else np.asarray(groups))
  make_spec(source, None, config.get('seed', 0), config.get('split_seed', 0),
            config.get('val_fraction', 0.1), config.test_fraction)


def build(source: Source, spec: dict[str, dict[str, Any]]) -> Dataset:
  splits = {}
  for split in SPLITS:
    part = source.parts[spec[split]['part']]
    rows = np.asarray(spec[split]['rows'], np.int64)
    if len(rows) and rows.max() >= len(part):
      raise DataError(
          f'the saved {split} split refers to image {rows.max()} of the source\'s '
          f'{spec[split]["part"]} part, which has {len(part)}: the data changed since the run '
          'started. Start a fresh workdir.')
    splits[split] = part.subset(rows)
  paths = {split: np.asarray(source.paths)[np.asarray(spec[split]['rows'], np.int64)]
           for split in SPLITS
           if source.paths is not None and spec[split]['part'] == 'train'}
  dataset = Dataset(source.name, source.class_names, splits, spec, source.notes,
                    source_fingerprint(source), paths)
  for split in SPLITS:
    if len(dataset.splits[split]) == 0:
      raise DataError(f'the {split} split of {source.name} is empty.')
  missing = [source.class_names[c] for c in np.flatnonzero(dataset.class_counts('train') == 0)]
  if missing:
    raise DataError(f'no training image for class(es) {missing} of {source.name}; remove the '
                    'class or add images of it.')
  return dataset


def source_fingerprint(source: Source) -> dict[str, dict[str, Any]]:
  """Per part of `source`: its image count and the SHA-256 of its labels, in order.

  An image added, removed or reordered changes it (unless only images of one class
  trade places within that class); an image's pixels do not.
  """
  return {name: {'images': len(part),
                 'labels_sha256': hashlib.sha256(
                     np.ascontiguousarray(part.labels, np.int64).tobytes()).hexdigest()}
          for name, part in sorted(source.parts.items())}


def check_fingerprint(saved: dict[str, dict[str, Any]], found: dict[str, dict[str, Any]],
                      what: str, where: str) -> None:
  """DataError unless the source `what` matches the fingerprint saved in `where`."""
  for name in sorted(set(saved) | set(found)):
    before, now = saved.get(name), found.get(name)
    if before == now:
      continue
    if before is None or now is None:
      change = (f'has a {name} part it did not have' if before is None
                else f'no longer has its {name} part')
    elif before['images'] != now['images']:
      # A source without its own val and test parts has one 'train' part: all its images,
      # before any split is carved from them.
      if len(found) > 1 or name != 'train':
        change = f"{name} part had {before['images']} images, now {now['images']}"
      else:
        change = (f"images (all of them, before the splits are carved) were "
                  f"{before['images']}, now {now['images']}")
    else:
      change = f"{name} part has the same {now['images']} images but other labels or order"
    raise DataError(
        f'{what} changed since {where} was written: its {change}. The saved splits are '
        'positions in that data, so they would now pick other images (test images could '
        'land in training). Restore the data as it was, or start a fresh workdir (for '
        'stage 2: a fresh stage 1 on this data).')


def spec_to_json(spec) -> dict:
  return {s: {'part': v['part'], 'rows': np.asarray(v['rows']).tolist()} for s, v in spec.items()}


def spec_from_json(payload) -> dict:
  return {s: {'part': v['part'], 'rows': np.asarray(v['rows'], np.int64)}
          for s, v in payload.items()}


def load(config, spec=None, fingerprint=None, saved_in: str = 'the saved split') -> Dataset:
  """The data set named by `config.dataset` with its protocol applied (or `spec`, if given).

  With `fingerprint` (saved with `spec`, in the file `saved_in`), a source that no
  longer matches it is refused (check_fingerprint).
  """
  from imbal_jax.data import readers

  if config.dataset not in readers.READERS:
    raise DataError(f'config.dataset={config.dataset!r} is not a known data set; choose one of '
                    f'{sorted(readers.READERS)}.')
  source = readers.READERS[config.dataset](config)
  if fingerprint:
    what = f'config.dataset={config.dataset!r}'
    if config.get('data_path'):
      what += f' at {config.data_path}'
    check_fingerprint(fingerprint, source_fingerprint(source), what, saved_in)
  if spec is None:
    spec = make_spec(source, config.imbalance_ratio, config.seed, config.get('split_seed', 0),
                     config.get('val_fraction', 0.1), config.get('test_fraction', 0.2))
  dataset = build(source, spec)
  stored = tuple(dataset.image_shape[:2])
  if (config.get('image_size') and config.dataset not in RESIZING_READERS
      and stored != (config.image_size, config.image_size)):
    raise DataError(
        f'config.image_size={config.image_size}, but {source.name} holds {stored[0]}x'
        f'{stored[1]} images, and only image-file data sets ({", ".join(RESIZING_READERS)}) are '
        f'resized: set --config.image_size={stored[0] if stored[0] == stored[1] else 0} '
        '(0: as stored)' + (', or prepare the cache again with --image_size='
                            f'{config.image_size}.' if config.dataset == 'prepared' else '.'))
  if config.imbalance_ratio is not None:
    # Said every time, so that images left out of training are never left out silently.
    carved = sum(len(spec[s]['rows']) for s in ('val', 'test') if spec[s]['part'] == 'train')
    available = len(source.parts['train']) - carved
    dataset = dataclasses.replace(dataset, notes=dataset.notes + (
        f'config.imbalance_ratio={config.imbalance_ratio:g} subsampled the training split to '
        f'{len(spec["train"]["rows"])} of its {available} images (the long-tail protocol); '
        '--config.imbalance_ratio=None keeps them all.',))
  return dataset


def require_path(path: str, field: str, what: str) -> pathlib.Path:
  """config.FIELD's path, which must exist; DataError saying to set it to `what`."""
  if not path:
    raise DataError(f'config.{field} is empty; set it to {what}.')
  resolved = pathlib.Path(path).expanduser()
  if not resolved.exists():
    where = '' if resolved.is_absolute() else f' (relative to the current directory {os.getcwd()})'
    raise DataError(f'config.{field}={path!r} does not exist{where}; set it to {what}.')
  return resolved
