"""Readers: files as distributed -> `Source`. One function per format.

Every problem with a file is one DataError naming the file and the fix; no
image or label is dropped without being counted (`skip_corrupt`).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import math
import pathlib
import struct
import zlib

import numpy as np

from imbal_jax.data import longtail
from imbal_jax.data.file_readers import csv_list, folder, isic, prepared
from imbal_jax.data.sources import DataError, Source, Split, require_path

# Published MD5 sums of official MedMNIST (v3, zenodo record 10519652) files, from
# the MedMNIST package's medmnist/info.py; the 28 px files keep their v2 names.
MEDMNIST_MD5 = {
    'pathmnist': ('a8b06965200029087d5bd730944a56c1', '55aa9c1e0525abe5a6b9d8343a507616',
                  'ac42d08fb904d92c244187169d1fd1d9', '2c51a510bcdc9cf8ddb2af93af1eadec'),
    'dermamnist': ('0744692d530f8e62ec473284d019b0c7', 'b70a2f5635c6199aeaa28c31d7202e1f',
                   '2defd784463fa5243564e855ed717de1', '8974907d8e169bef5f5b96bc506ae45d'),
    'octmnist': ('c68d92d5b585d8d81f7112f81e2d0842', 'e229e9440236b774d9f0dfef9d07bdaf',
                 '0a97e76651ace45c5d943ee3f65b63ae', 'abc493b6d529d5de7569faaef2773ba3'),
    'pneumoniamnist': ('28209eda62fecd6e6a2d98b1501bb15f', '8f4eceb4ccffa70c672198ea285246c6',
                       '05b46931834c231683c68f40c47b2971', 'd6a3c71de1b945ea11211b03746c1fe1'),
    'retinamnist': ('bd4c0672f1bba3e3a89f0e4e876791e4', 'afda852cc34dcda56f86ad2b2457dbcc',
                    'e48e916a24454daf90583d4e6efb1a18', 'eae7e3b6f3fcbda4ae613ebdcbe35348'),
    'breastmnist': ('750601b1f35ba3300ea97c75c52ff8f6', '742edef2a1fd1524b2efff4bd7ba9364',
                    '363e4b3f8d712e9b5de15470a2aaadf1', 'b56378a6eefa9fed602bb16d192d4c8b'),
    'bloodmnist': ('7053d0359d879ad8a5505303e11de1dc', '2b94928a2ae4916078ca51e05b6b800b',
                   'adace1e0ed228fccda1f39692059dd4c', 'b718ff6835fcbdb22ba9eacccd7b2601'),
    'tissuemnist': ('ebe78ee8b05294063de985d821c1c34b', '123ece2eba09d0aa5d698fda57103344',
                    '61b955355d7425a89687b06cca3ce0c2', 'b077128c4a949f0a4eb01517f9037b9c'),
}
MEDMNIST_SIZES = (28, 64, 128, 224)
# Without a class list, a label above this is a corrupt label, not a class (ImageNet-21k: 21,841).
MAX_CLASSES = 100_000


def _sidecar_class_names(path: pathlib.Path) -> list[str] | None:
  """Class names from `<file>.json` ('classes') or `classes.txt` beside the data."""
  sidecar = path.with_suffix('.json') if path.is_file() else path / 'classes.json'
  text = (path.parent if path.is_file() else path) / 'classes.txt'
  for candidate in (sidecar, text):
    if not candidate.is_file():
      continue
    try:
      content = candidate.read_text(encoding='utf-8')
      if candidate is text:
        return [line.strip() for line in content.splitlines() if line.strip()]
      payload = json.loads(content)
    except (OSError, ValueError) as error:  # JSONDecodeError, UnicodeDecodeError
      raise DataError(f'{candidate}: cannot read the class list ({error}).') from None
    if not isinstance(payload, dict):
      raise DataError(f'{candidate}: expected a JSON object {{"classes": [...]}}, got '
                      f'{type(payload).__name__}.')
    if isinstance(payload.get('classes'), list):
      return [str(name) for name in payload['classes']]
  return None


def _class_names(path: pathlib.Path, labels: list[np.ndarray]) -> tuple[str, ...]:
  filled = [l for l in labels if len(l)]
  if not filled:
    raise DataError(f'{path}: no labels in any part: the data set is empty.')
  highest = max(int(l.max()) for l in filled) + 1
  names = _sidecar_class_names(path)
  if names is None:
    if highest > MAX_CLASSES:
      raise DataError(f'{path}: labels go up to {highest - 1}, i.e. {highest} classes without a '
                      'class list: fix the labels or add the class list (<file>.json with '
                      '"classes", or classes.txt).')
    return tuple(str(c) for c in range(highest))
  if len(names) < highest:
    raise DataError(f'{path}: labels go up to {highest - 1} but the class-name metadata lists '
                    f'only {len(names)} classes; fix the labels or the class list.')
  return tuple(names)


def _as_nhwc(images: np.ndarray, where: str) -> np.ndarray:
  if images.dtype != np.uint8:
    raise DataError(f'{where}: images must be uint8 (0-255), got {images.dtype}.')
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise DataError(f'{where}: images must be [n, height, width] or [n, height, width, 1|3], '
                    f'got shape {images.shape}.')
  return images


def _as_labels(labels: np.ndarray, count: int, where: str) -> np.ndarray:
  if labels.ndim == 2 and labels.shape[1] == 1:
    labels = labels[:, 0]
  if labels.ndim != 1:
    raise DataError(f'{where}: labels must be one integer per image (multi-label data such as '
                    f'ChestMNIST is not supported), got shape {labels.shape}.')
  if len(labels) != count:
    raise DataError(f'{where}: {count} images but {len(labels)} labels.')
  if not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f'{where}: labels must be integers, got {labels.dtype}.')
  if len(labels) and labels.min() < 0:
    raise DataError(f'{where}: negative label {labels.min()}; labels must be 0..C-1.')
  if len(labels) and labels.max() > np.iinfo(np.int32).max:
    raise DataError(f'{where}: label {labels.max()} is beyond int32; labels must be 0..C-1.')
  return labels.astype(np.int32)


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digits as (images [1797, 8, 8] float64 in 0..16, labels int32).

  Read from the CSV file that scikit-learn ships, without importing scikit-learn:
  its import takes about 2.7 s, more than the rest of a small run's start-up
  (`sklearn.datasets.load_digits` reads the same file; a test checks they agree).
  """
  spec = importlib.util.find_spec('sklearn')
  if spec is None or not spec.submodule_search_locations:
    raise DataError('the digits data set ships with scikit-learn: pip install scikit-learn.')
  path = pathlib.Path(spec.submodule_search_locations[0]) / 'datasets' / 'data' / 'digits.csv.gz'
  if not path.exists():  # a layout this reader does not know: ask scikit-learn itself
    from sklearn.datasets import load_digits
    bunch = load_digits()
    return bunch.images, bunch.target.astype(np.int32)
  with gzip.open(path, 'rt') as handle:
    table = np.loadtxt(handle, delimiter=',')
  return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int32)


def digits(config) -> Source:
  """scikit-learn's handwritten digits (8x8 grey, 10 classes), shipped with scikit-learn.

  Validation and test are balanced hold-outs of 20 and 40 images per class,
  fixed by split_seed; the rest is the training pool.
  """
  pixels, labels = digits_arrays()
  # Pixel values are 0..16; scale to the 0..255 range every other source uses.
  images = np.clip(pixels * 16.0, 0, 255).astype(np.uint8)[..., None]
  split_seed = config.get('split_seed', 0)
  test, pool = longtail.balanced_holdout(labels, 10, 40, split_seed)
  val_in_pool, train_in_pool = longtail.balanced_holdout(labels[pool], 10, 20, split_seed + 1)
  parts = {'train': pool[train_in_pool], 'val': pool[val_in_pool], 'test': test}
  return Source('digits', tuple(str(d) for d in range(10)),
                {name: Split(images[idx], labels[idx]) for name, idx in parts.items()},
                balanced=True)


def medmnist_md5_note(path: pathlib.Path) -> str | None:
  """Checks an official MedMNIST file name against its published MD5; a note or None."""
  stem = path.stem
  name, _, size = stem.partition('_')
  if name not in MEDMNIST_MD5:
    return None
  size = int(size) if size.isdigit() else 28
  if size not in MEDMNIST_SIZES:
    return None
  expected = MEDMNIST_MD5[name][MEDMNIST_SIZES.index(size)]
  digest = hashlib.md5()
  with path.open('rb') as handle:
    for chunk in iter(lambda: handle.read(1 << 20), b''):
      digest.update(chunk)
  if digest.hexdigest() == expected:
    return f'{path.name}: MD5 matches the published MedMNIST file.'
  return (f'{path.name}: MD5 {digest.hexdigest()} differs from the published {expected} of the '
          'official MedMNIST file: this is a different or modified copy.')


def medmnist(config) -> Source:
  """A MedMNIST-layout .npz: {train,val,test}_{images,labels}, grey or RGB, any size."""
  path = require_path(config.data_path, 'data_path', 'a MedMNIST-format .npz file')
  try:
    archive = np.load(path, allow_pickle=False)
  except Exception as error:  # zip, pickle and value errors all mean: not a usable npz
    raise DataError(f'{path}: not a readable .npz file ({error}).') from None
  if not isinstance(archive, np.lib.npyio.NpzFile):
    raise DataError(f'{path}: a single .npy array, not an .npz archive of train_/val_/test_ '
                    'images and labels.')

  def entry(key):
    try:
      return archive[key]
    except Exception as error:  # bad CRC, truncated member, object (pickled) array, ...
      raise DataError(f'{path}: entry {key} cannot be read ({type(error).__name__}: {error}); '
                      'the file is damaged or was not written by numpy.savez.') from None

  with archive:
    keys = set(archive.files)
    # A damaged central directory can merge entries into one key holding binary bytes
    # (the zip signature PK\x01\x02): parts would vanish silently, so refuse it.
    damaged = sorted(k for k in keys if not k.isprintable())
    if damaged:
      raise DataError(f'{path}: damaged archive: entry names {[k[:40] for k in damaged]} hold '
                      'binary data (a corrupt zip directory). Download or write the file again.')
    parts = [p for p in ('train', 'val', 'test') if f'{p}_images' in keys]
    # Labels of a part without images would silently vanish: report the images as missing.
    missing = [k for p in ('train', 'val', 'test') for k in (f'{p}_images', f'{p}_labels')
               if k not in keys and (p == 'train' or p in parts or f'{p}_labels' in keys)]
    if 'train' not in parts or missing:
      raise DataError(f'{path}: missing key(s) {sorted(set(missing) or {"train_images"})}; a '
                      f'MedMNIST file has train_/val_/test_ images and labels (found '
                      f'{sorted(keys)}).')
    splits = {}
    for part in parts:
      images = _as_nhwc(entry(f'{part}_images'), f'{path}[{part}_images]')
      labels = _as_labels(entry(f'{part}_labels'), len(images), f'{path}[{part}_labels]')
      splits[part] = Split(images, labels)
  class_names = _class_names(path, [s.labels for s in splits.values()])
  note = medmnist_md5_note(path)
  return Source(path.stem, class_names, splits, notes=(note,) if note else ())


def _read_idx(path: pathlib.Path) -> np.ndarray:
  opener = gzip.open if path.suffix == '.gz' else open
  try:
    with opener(path, 'rb') as handle:
      raw = handle.read()
  except (OSError, EOFError, zlib.error) as error:
    raise DataError(f'{path}: cannot read ({error}).') from None
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
    raise DataError(f'{path}: not an unsigned-byte IDX file (bad magic number).')
  ndim = raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise DataError(f'{path}: truncated IDX header.')
  shape = struct.unpack(f'>{ndim}I', raw[4:header])
  expected = math.prod(shape)  # exact: np.prod wraps at 2**64
  if len(raw) - header != expected:
    raise DataError(f'{path}: header says shape {shape} ({expected} bytes) but the file holds '
                    f'{len(raw) - header} bytes: truncated or corrupt.')
  return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _idx_file(directory: pathlib.Path, stem: str) -> pathlib.Path:
  for candidate in (directory / stem, directory / f'{stem}.gz'):
    if candidate.is_file():
      return candidate
  raise DataError(f'{directory}: no {stem} or {stem}.gz; an IDX data set (MNIST layout) has '
                  'train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte '
                  'and t10k-labels-idx1-ubyte.')


def idx(config) -> Source:
  """IDX files (MNIST / Fashion-MNIST layout): 'train' and 't10k' -> train and test."""
  directory = require_path(config.data_path, 'data_path', 'a folder with MNIST-layout IDX files')
  parts = {}
  for part, prefix in (('train', 'train'), ('test', 't10k')):
    images_path = _idx_file(directory, f'{prefix}-images-idx3-ubyte')
    images = _as_nhwc(_read_idx(images_path), str(images_path))
    labels_path = _idx_file(directory, f'{prefix}-labels-idx1-ubyte')
    labels = _as_labels(_read_idx(labels_path), len(images), str(labels_path))
    parts[part] = Split(images, labels)
  class_names = _class_names(directory, [s.labels for s in parts.values()])
  return Source(directory.name, class_names, parts, balanced=True)


def tfds_source(config) -> Source:
  """A data set prepared by tensorflow-datasets in array_record format (tfds.data_source)."""
  import tensorflow_datasets as tfds

  name = config.tfds_name
  try:
    builder = tfds.builder(name, data_dir=config.data_dir or None)
    info = builder.info
    parts = {}
    for part in ('train', 'validation', 'test'):
      if part not in info.splits:
        continue
      source = tfds.data_source(name, split=part, data_dir=config.data_dir or None,
                                download=False)
      records = [source[i] for i in range(len(source))]
      images = _as_nhwc(np.stack([np.asarray(r['image']) for r in records]), f'{name}:{part}')
      labels = _as_labels(np.asarray([r['label'] for r in records]), len(images), f'{name}:{part}')
      parts['val' if part == 'validation' else part] = Split(images, labels)
    if not info.splits:
      raise DataError(f'tfds data set {name!r} is not prepared in config.data_dir='
                      f'{config.data_dir!r}; build it first, e.g. `tfds build {name} '
                      '--file_format=array_record`.')
    if 'train' not in parts:
      raise DataError(f'tfds data set {name!r} has no train split (splits: '
                      f'{sorted(info.splits)}).')
    class_names = tuple(info.features['label'].names)
  except DataError:
    raise
  except Exception as error:
    raise DataError(f'tfds data set {name!r} in config.data_dir={config.data_dir!r} cannot be '
                    f'read as array_record ({type(error).__name__}: {error}). Prepare it first, '
                    f'e.g. `tfds build {name} --file_format=array_record`.') from None
  # CIFAR-style sets (equal class counts) rank classes by index for the long-tail
  # profile, the CIFAR-LT convention; naturally imbalanced ones (e.g. SVHN) by count.
  return Source(name, class_names, parts,
                balanced=equal_class_counts(parts['train'].labels, len(class_names)))


def equal_class_counts(labels: np.ndarray, num_classes: int) -> bool:
  """Whether every one of `num_classes` classes has the same number of `labels`."""
  counts = np.bincount(labels, minlength=num_classes)
  return bool(counts.min() == counts.max())


READERS = {
    'digits': digits,
    'medmnist': medmnist,
    'idx': idx,
    'folder': folder,
    'csv': csv_list,
    'isic': isic,
    'prepared': prepared,
    'tfds': tfds_source,
}
