"""Readers of image files (a class-folder tree, a path,label CSV, ISIC's folder and
ground-truth CSV) and of the caches `python -m imbal_jax.prepare` writes from them.

`imbal_jax.data.readers.READERS` maps config.dataset to these and to the readers of
array data sets (digits, MedMNIST, IDX, tfds).
"""

from __future__ import annotations

import json

import numpy as np

from imbal_jax.data import imagefiles, sources
from imbal_jax.data.sources import DataError, Source, Split, require_path


def _image_source(config, name: str, paths, labels, class_names, groups=None,
                  notes=()) -> Source:
  sources.check_splits_before_decoding(config, labels, class_names, groups)
  images, kept, decode_notes = imagefiles.decode_all(
      paths, config.image_size, skip_corrupt=config.skip_corrupt,
      bit_depth=config.get('bit_depth') or imagefiles.DEFAULT_BIT_DEPTH)
  notes = tuple(notes) + decode_notes
  labels = np.asarray(labels, np.int32)[kept]
  return Source(name, tuple(class_names), {'train': Split(images, labels)}, notes=notes,
                groups=None if groups is None else np.asarray(groups)[kept],
                paths=np.asarray([str(p) for p in paths])[kept])


def folder(config) -> Source:
  """One sub-folder per class (ImageFolder; nested folders as in Hyper-Kvasir)."""
  root = require_path(config.data_path, 'data_path', 'a folder with one sub-folder per class')
  paths, labels, class_names, notes = imagefiles.scan_class_folders(root)
  return _image_source(config, root.name, paths, labels, class_names, notes=notes)


def csv_list(config) -> Source:
  """A CSV with columns path,label (paths relative to the CSV's folder)."""
  csv_path = require_path(config.data_path, 'data_path', 'a CSV file with columns path,label')
  paths, labels, class_names = imagefiles.read_path_label_csv(csv_path)
  return _image_source(config, csv_path.stem, paths, labels, class_names)


def isic(config) -> Source:
  """ISIC 2018 Task 3 / ISIC 2019: an image folder plus the ground-truth CSV."""
  image_dir = require_path(config.data_path, 'data_path', 'the ISIC training-image folder')
  csv_path = require_path(config.labels_csv, 'labels_csv', 'the ISIC ground-truth CSV')
  paths, labels, class_names, notes = imagefiles.read_isic_csv(csv_path, image_dir)
  groups = None
  if config.get('groups_csv'):
    groups_path = require_path(config.groups_csv, 'groups_csv',
                           'the ISIC metadata CSV (columns image, lesion_id)')
    groups, group_notes = imagefiles.read_groups_csv(groups_path, [p.stem for p in paths])
    notes += group_notes
  source = _image_source(config, csv_path.stem, paths, labels, class_names, groups)
  return Source(source.name, source.class_names, source.parts, notes=notes + source.notes,
                groups=source.groups, paths=source.paths)


def prepared(config) -> Source:
  """A cache written by `python -m imbal_jax.prepare` (memory-mapped .npy files)."""
  directory = require_path(config.data_path, 'data_path', 'a folder written by imbal_jax.prepare')
  meta_path = directory / 'meta.json'
  if not meta_path.is_file():
    raise DataError(f'{directory}: no meta.json; it was not written by imbal_jax.prepare '
                    '(or preparation did not finish). Run the prepare command again.')
  damaged = (f'{directory} is damaged or incomplete: {{}}. Run the prepare command again '
             'into a new folder.')
  try:
    meta = json.loads(meta_path.read_text())
    name, class_names = meta['name'], tuple(meta['class_names'])
  except (ValueError, KeyError, TypeError) as error:
    raise DataError(damaged.format(f'{meta_path} cannot be read ({error})')) from None
  arrays = {}
  for array, mmap_mode in (('images', 'r'), ('labels', None), ('parts', None)):
    try:
      arrays[array] = np.load(directory / f'{array}.npy', mmap_mode=mmap_mode)
    except (OSError, ValueError) as error:
      raise DataError(damaged.format(f'{array}.npy cannot be read ({error})')) from None
  images, labels, parts = arrays['images'], arrays['labels'], arrays['parts']
  if not len(images) == len(labels) == len(parts) or images.ndim != 4:
    raise DataError(damaged.format(f'images.npy {images.shape}, labels.npy {labels.shape} and '
                                   f'parts.npy {parts.shape} do not describe the same images'))
  for array, values, limit in (('labels', labels, len(class_names)), ('parts', parts, 3)):
    if len(values) and (values.min() < 0 or values.max() >= limit):
      raise DataError(damaged.format(f'{array}.npy holds values outside 0..{limit - 1}'))
  splits = {part: Split(images, labels[parts == code], np.flatnonzero(parts == code))
            for code, part in enumerate(('train', 'val', 'test')) if np.any(parts == code)}
  if 'train' not in splits:
    raise DataError(damaged.format('it holds no training images'))
  # The run records the depth the cache was decoded with, so that predict decodes
  # image files as these were (caches written before the field: 16).
  prepared_depth = meta.get('bit_depth', imagefiles.DEFAULT_BIT_DEPTH)
  if config.get('bit_depth') and config.bit_depth != prepared_depth:
    raise DataError(f'config.bit_depth={config.bit_depth}, but {directory} was prepared with '
                    f'--bit_depth={prepared_depth}: set --config.bit_depth={prepared_depth}, or '
                    f'prepare the cache again with --bit_depth={config.bit_depth}.')
  groups = None
  if (directory / 'groups.npy').is_file():  # written where prepare had --groups_csv
    groups = np.load(directory / 'groups.npy')
    if 'train' not in splits or len(groups) != len(splits['train']):
      raise DataError(damaged.format(f'groups.npy holds {len(groups)} groups for the '
                                     f'{len(splits.get("train", ()))} training images'))
  paths = None
  if (directory / 'paths.npy').is_file():  # the decoded files, written by prepare
    paths = np.load(directory / 'paths.npy')
    if len(paths) != len(splits['train']):
      raise DataError(damaged.format(f'paths.npy holds {len(paths)} paths for the '
                                     f'{len(splits["train"])} training images'))
  return Source(name, class_names, splits, notes=tuple(meta.get('notes', ())), groups=groups,
                paths=paths)
