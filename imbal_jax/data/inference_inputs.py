"""Inputs for prediction: a folder of images, a .npz, a CSV of paths, or one image.

Each input is read lazily and given the model's shape: decoded and resized as
training data was, then converted to the model's channel count (RGB to grey
with the ITU-R 601 luma weights, grey to RGB by repetition).
"""

from __future__ import annotations

import csv
import dataclasses
import pathlib
from typing import Callable

import numpy as np
from PIL import Image

from imbal_jax.data.imagefiles import (DEFAULT_BIT_DEPTH, IMAGE_SUFFIXES, decode_image,
                                       left_out_notes, sort_files, walk_files)
from imbal_jax.data.sources import DataError

# ITU-R BT.601 luma, the weights PIL's convert('L') uses.
LUMA_WEIGHTS = np.asarray([0.299, 0.587, 0.114])


class PredictError(ValueError):
  """A workdir, input or flag that cannot be used; the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class Inputs:
  """What to predict: a name per input and a reader that gives it in the model's shape."""

  names: list[str]
  read: Callable[[int], np.ndarray]  # index -> uint8 [h, w, c]; DataError naming the input
  notes: tuple[str, ...] = ()
  # A CSV's `label` column, as written ('' where a row has none); None without one.
  labels: list[str] | None = None


def conform(image: np.ndarray, image_shape) -> np.ndarray:
  """One uint8 [h, w, 1|3] image -> the model's [height, width, channels]."""
  height, width, channels = image_shape
  if image.shape[-1] == 3 and channels == 1:
    image = np.clip(np.rint(image @ LUMA_WEIGHTS), 0, 255).astype(np.uint8)[..., None]
  if image.shape[:2] != (height, width):
    resized = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).resize(
        (width, height), Image.BILINEAR)
    image = np.asarray(resized, np.uint8).reshape(height, width, image.shape[-1])
  if image.shape[-1] == 1 and channels == 3:
    image = np.repeat(image, 3, axis=-1)
  return image


def _read_file(path: pathlib.Path, image_shape,
               bit_depth: int = DEFAULT_BIT_DEPTH) -> np.ndarray:
  if not path.is_file():
    raise DataError(f'{path}: no such file.')
  # Decoded as the training images were (RGB, shorter side resized, centre crop).
  return conform(decode_image(path, image_shape[0], bit_depth), image_shape)


def _folder_inputs(root: pathlib.Path, image_shape,
                   bit_depth: int = DEFAULT_BIT_DEPTH) -> Inputs:
  # Listed as the training reader lists folders (symlinked sub-folders followed).
  images, others, hidden = sort_files(root, walk_files(root))
  if not images:
    raise PredictError(f'--input={root} holds no image files ({", ".join(sorted(IMAGE_SUFFIXES))})'
                       ' in it or its sub-folders.')
  # Said, not silently skipped: a .dcm or .jp2 may be meant as an image.
  notes = left_out_notes(root, others, hidden)
  return Inputs([str(p) for p in images],
                lambda i: _read_file(images[i], image_shape, bit_depth), notes)


def _csv_inputs(csv_path: pathlib.Path, image_shape,
                bit_depth: int = DEFAULT_BIT_DEPTH) -> Inputs:
  try:
    # utf-8-sig: spreadsheet programs start CSVs with a byte-order mark.
    with csv_path.open(newline='', encoding='utf-8-sig') as handle:
      reader = csv.DictReader(handle)
      columns = reader.fieldnames or []
      rows = list(reader)
  except (OSError, UnicodeDecodeError, csv.Error) as error:
    raise PredictError(f'--input={csv_path}: not a readable UTF-8 CSV ({error}).') from None
  if 'path' not in columns:
    raise PredictError(f'--input={csv_path}: no `path` column (found {columns}); list the '
                       'images in a column named path, relative to the CSV\'s folder.')
  if not rows:
    raise PredictError(f'--input={csv_path}: no rows, so no images to predict.')
  names = [row['path'] or '' for row in rows]

  def read(i):
    if not names[i].strip():
      raise DataError(f'{csv_path}: row {i + 1} has an empty path.')
    return _read_file(csv_path.parent / names[i], image_shape, bit_depth)

  labels = [(row.get('label') or '').strip() for row in rows] if 'label' in columns else None
  return Inputs(names, read, labels=labels)


def _npz_key(npz_path: pathlib.Path, keys: list[str]) -> tuple[str, tuple[str, ...]]:
  if 'images' in keys:
    return 'images', ()
  candidates = sorted(k for k in keys if k.endswith('_images'))
  if len(candidates) == 1:
    return candidates[0], ()
  if 'test_images' in candidates:
    return 'test_images', (f'{npz_path.name} holds {candidates}: predicting test_images.',)
  if not candidates:
    raise PredictError(f'--input={npz_path}: no `images` array (nor a MedMNIST-style '
                       f'`test_images`); found {keys}.')
  raise PredictError(f'--input={npz_path}: several image arrays {candidates} and no '
                     '`test_images`; save the one to predict as `images`.')


def _npz_inputs(npz_path: pathlib.Path, image_shape) -> Inputs:
  # Any exception: a damaged archive raises zlib.error, EOFError and others besides these.
  try:
    archive = np.load(npz_path, allow_pickle=False)
  except Exception as error:  # noqa: BLE001
    raise PredictError(f'--input={npz_path}: cannot read it as a .npz ({error}).') from None
  with archive:
    key, notes = _npz_key(npz_path, list(archive.files))
    try:
      images = archive[key]
    except Exception as error:  # noqa: BLE001
      raise PredictError(f'--input={npz_path}: cannot read {key} ({error}).') from None
  where = f'{npz_path.name}[{key}]'
  if images.dtype != np.uint8:
    raise PredictError(f'--input={npz_path}: {key} must be uint8 (0-255) as training data is, '
                       f'got {images.dtype}.')
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise PredictError(f'--input={npz_path}: {key} must be [n, height, width] or '
                       f'[n, height, width, 1|3], got shape {images.shape}.')
  if not len(images):
    raise PredictError(f'--input={npz_path}: {key} holds no images.')
  height, width, channels = image_shape
  if images.shape[-1] == 3 and channels == 1:
    notes += (f'{where} is RGB: converted to grey (ITU-R 601 luma) for the model\'s 1-channel '
              'input.',)
  if images.shape[1:3] != (height, width):
    notes += (f'{where} images are {images.shape[1]}x{images.shape[2]}: resized to the model\'s '
              f'{height}x{width} with bilinear interpolation.',)
  return Inputs([str(i) for i in range(len(images))], lambda i: conform(images[i], image_shape),
                notes)


def file_decoding_note(image_shape) -> str:
  """What happens to an image file on its way to the model (_read_file)."""
  height, width, channels = image_shape
  return (f'image files are decoded as the training images were: shorter side resized to '
          f'{height} px and centre-cropped to {height}x{width}'
          + (', then made grey (ITU-R 601 luma)' if channels == 1 else '') + '.')


def read_inputs(path: str | pathlib.Path, image_shape,
                bit_depth: int = DEFAULT_BIT_DEPTH) -> Inputs:
  """The inputs at `path`: a folder of images, a .npz, a CSV with a path column, or an image.

  `bit_depth`: the training run's config.bit_depth, for 16-bit image files.
  """
  path = pathlib.Path(path)
  image_shape = tuple(image_shape)
  if not path.exists():
    raise PredictError(f'--input={path} does not exist.')
  if path.is_dir():
    found = _folder_inputs(path, image_shape, bit_depth)
  else:
    suffix = path.suffix.lower()
    if suffix == '.npz':
      return _npz_inputs(path, image_shape)  # its own note says how it is conformed
    if suffix == '.csv':
      found = _csv_inputs(path, image_shape, bit_depth)
    elif suffix in IMAGE_SUFFIXES:
      found = Inputs([str(path)], lambda i: _read_file(path, image_shape, bit_depth))
    else:
      found = None
  if found is not None:
    return dataclasses.replace(found, notes=found.notes + (file_decoding_note(image_shape),))
  raise PredictError(f'--input={path}: expected a folder of images, a .npz, a .csv with a path '
                     f'column or an image file ({", ".join(sorted(IMAGE_SUFFIXES))}).')
