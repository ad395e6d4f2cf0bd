"""Image files: listing class folders and label CSVs, and decoding to uint8 arrays.

Decoding resizes the shorter side to `image_size` and centre-crops a square,
once; training then reads arrays (or a prepared cache), never JPEGs.
"""

from __future__ import annotations

import concurrent.futures
import csv
import os
import pathlib

import numpy as np
from PIL import Image
from tqdm import tqdm

from imbal_jax.data.sources import DataError

IMAGE_SUFFIXES = {'.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp'}


# The significant bits of 16-bit grey images unless config.bit_depth says otherwise.
DEFAULT_BIT_DEPTH = 16


def decode_image(path: pathlib.Path, image_size: int,
                 bit_depth: int = DEFAULT_BIT_DEPTH) -> np.ndarray:
  """One RGB uint8 [image_size, image_size, 3] image; raises DataError naming the file.

  16-bit grey images keep the top 8 of their `bit_depth` significant bits (to_8_bits).
  """
  try:
    with Image.open(path) as image:
      limit = Image.MAX_IMAGE_PIXELS
      if limit and image.width * image.height > limit:  # PIL only warns up to 2x its limit
        raise DataError(f'{path}: {image.width}x{image.height} pixels is over the decoding limit '
                        f'of {limit} (PIL.Image.MAX_IMAGE_PIXELS); downscale the file first.')
      if image.mode.startswith('I;16'):  # 16-bit grey (convert would clip at 255)
        image = Image.fromarray(to_8_bits(np.asarray(image), bit_depth))
      elif image.mode in ('I', 'F'):
        raise DataError(f'{path}: 32-bit ({image.mode}) images are not supported; convert the '
                        'file to 8 or 16 bits.')
      image = image.convert('RGB')
      width, height = image.size
      scale = image_size / min(width, height)
      resized = image.resize((max(image_size, round(width * scale)),
                              max(image_size, round(height * scale))), Image.BILINEAR)
      left = (resized.width - image_size) // 2
      top = (resized.height - image_size) // 2
      return np.asarray(resized.crop((left, top, left + image_size, top + image_size)), np.uint8)
  except DataError:
    raise
  except Exception as error:  # PIL raises many types for broken files, bombs included
    raise DataError(f'{path}: cannot decode image ({type(error).__name__}: {error}).') from None


def to_8_bits(pixels: np.ndarray, bit_depth: int = DEFAULT_BIT_DEPTH) -> np.ndarray:
  """16-bit grey pixels as uint8: the top 8 of `bit_depth` significant bits.

  One depth for every image of a data set (config.bit_depth), so that a value means
  the same brightness in every image. Medical exports often store 10-, 12- or 14-bit
  values in 16-bit files: at the default 16 a 12-bit image keeps 16 grey levels, so
  such data wants its own depth (--config.bit_depth=12). Values above the depth
  saturate at 255.
  """
  shifted = pixels.astype(np.uint32) >> (bit_depth - 8)
  return np.minimum(shifted, 255).astype(np.uint8)


def _unreadable_error(failed) -> DataError:
  """One error naming the images of `failed` [(index, message)], the first ten shown."""
  shown = '\n  '.join(message for _, message in failed[:10])
  more = f'\n  ... and {len(failed) - 10} more' if len(failed) > 10 else ''
  return DataError(f'{len(failed)} image(s) cannot be read:\n  {shown}{more}\nFix or remove '
                   'them, or set config.skip_corrupt=True to leave them out (they are then '
                   'counted in the log and report).')


def _none_readable(failed) -> DataError:
  return DataError(f'none of the {len(failed)} image(s) can be read, so nothing is left to '
                   f'train on; the first: {failed[0][1]}')


def decode_all(paths, image_size: int, skip_corrupt: bool = False, workers: int | None = None,
               bit_depth: int = DEFAULT_BIT_DEPTH):
  """(images [n, s, s, 3] uint8, indices of `paths` kept, notes).

  A file that cannot be decoded stops everything with its name, unless
  `skip_corrupt`, when it is left out and listed in the notes.
  """
  if not image_size or image_size <= 0:
    raise DataError('config.image_size must be set (e.g. 64) for data sets of image files: '
                    'every image is resized to image_size x image_size.')
  paths = [pathlib.Path(p) for p in paths]
  # Files that are not there are reported before anything is decoded (a data set of
  # tens of thousands of images takes minutes to decode); corrupt ones come after.
  missing = [(i, f'{path}: cannot decode image (no such file).')
             for i, path in enumerate(paths) if not path.is_file()]
  if missing and not skip_corrupt:
    raise _unreadable_error(missing)
  if paths and len(missing) == len(paths):
    raise _none_readable(missing)
  images = np.zeros((len(paths), image_size, image_size, 3), np.uint8)
  failed = []
  workers = workers or min(8, os.cpu_count() or 1)

  def work(i):
    try:
      images[i] = decode_image(paths[i], image_size, bit_depth)
      return None
    except DataError as error:
      return i, str(error)

  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for result in tqdm(pool.map(work, range(len(paths))), total=len(paths), desc='decoding',
                       unit='img', leave=False, disable=len(paths) < 500):
      if result is not None:
        failed.append(result)
  if failed and not skip_corrupt:
    raise _unreadable_error(failed)
  if paths and len(failed) == len(paths):  # skip_corrupt must not leave no image at all
    raise _none_readable(failed)
  bad = {i for i, _ in failed}
  kept = np.asarray([i for i in range(len(paths)) if i not in bad], np.int64)
  notes = tuple(f'skipped corrupt image: {message}' for _, message in failed)
  # Indexing copies: only where images were left out.
  return (images if len(kept) == len(paths) else images[kept]), kept, notes


def walk_files(root: pathlib.Path):
  """Every file below `root`, in sorted order; symlinked folders are followed, each once.

  (os.walk with followlinks: Path.rglob does not follow symlinked folders before
  Python 3.13; `seen` stops loops.)
  """
  seen = set()
  for directory, subdirectories, files in os.walk(root, followlinks=True):
    real = os.path.realpath(directory)
    if real in seen:
      subdirectories[:] = []
      continue
    seen.add(real)
    subdirectories.sort()
    for name in sorted(files):
      path = pathlib.Path(directory) / name
      if path.is_file():
        yield path


def is_image_name(path: pathlib.Path) -> bool:
  return path.suffix.lower() in IMAGE_SUFFIXES


def is_hidden(root: pathlib.Path, path: pathlib.Path) -> bool:
  """Below a name starting with '.' or a __MACOSX folder (a macOS zip's ._ copies of
  every image, which are not images), relative to `root`."""
  return any(part.startswith('.') or part == '__MACOSX'
             for part in path.relative_to(root).parts)


def sort_files(root: pathlib.Path, files):
  """(images, files without an image suffix, hidden files) of `files` below `root`."""
  images, others, hidden = [], [], []
  for path in files:
    (hidden if is_hidden(root, path) else images if is_image_name(path) else others).append(path)
  return images, others, hidden


def left_out_notes(root: pathlib.Path, others, hidden) -> tuple[str, ...]:
  """Notes naming the files below `root` left out for their suffix, and counting the
  hidden ones."""
  notes = []
  if others:
    shown = ', '.join(_printable(str(p.relative_to(root))) for p in others[:5])
    notes.append(f'left out {len(others)} file(s) without an image suffix '
                 f'({", ".join(sorted(IMAGE_SUFFIXES))}): {shown}'
                 f'{", ..." if len(others) > 5 else ""}')
  if hidden:
    notes.append(f'left out {len(hidden)} hidden file(s) (a name starting with "." or a '
                 f'__MACOSX folder on the path), e.g. {_printable(str(hidden[0].relative_to(root)))}')
  return tuple(notes)


def scan_class_folders(root: pathlib.Path):
  """(paths, labels, class names, notes): every folder that directly holds images is a class.

  Class names are folder names, or paths relative to `root` where two folders
  share a name (nested layouts such as Hyper-Kvasir's). Files without an image
  suffix are left out and named in the notes; a folder holding such files and no
  image anywhere below it would be a class lost without a word, so it is refused.
  Hidden files (is_hidden) are left out and counted in the notes.
  """
  by_folder: dict[pathlib.Path, list[pathlib.Path]] = {}
  images, others, hidden = sort_files(root, walk_files(root))
  for path in images:
    by_folder.setdefault(path.parent, []).append(path)
  holding_images = {root} | {a for folder in by_folder for a in (folder, *folder.parents)}
  imageless = sorted({p.parent for p in others if p.parent not in holding_images})
  if imageless:
    folder = imageless[0]
    found = sorted({p.suffix.lower() or p.name for p in others if p.parent == folder})
    more = f' ({len(imageless)} such folders.)' if len(imageless) > 1 else ''
    raise DataError(f'{_printable(str(folder))}: holds files ({", ".join(found)}) but no image '
                    f'with a suffix the reader takes ({", ".join(sorted(IMAGE_SUFFIXES))}), so '
                    'it would not be a class; convert its images (e.g. to PNG) or move the '
                    f'folder out of the data folder.{more}')
  by_folder = {folder: sorted(paths) for folder, paths in by_folder.items()}
  if root in by_folder:
    raise DataError(f'{root}: images lie directly in the data folder; put each class in its own '
                    'sub-folder (root/CLASS/image.jpg).')
  if not by_folder:
    raise DataError(f'{root}: no image files ({", ".join(sorted(IMAGE_SUFFIXES))}) found in '
                    'class sub-folders.')
  folders = sorted(by_folder)
  leaf_names = [f.name for f in folders]
  unique = len(set(leaf_names)) == len(leaf_names)
  # Names must be writable text: non-UTF-8 bytes in a folder name are shown as \xNN.
  class_names = [_printable(f.name if unique else str(f.relative_to(root))) for f in folders]
  paths, labels = [], []
  for label, folder in enumerate(folders):
    paths += by_folder[folder]
    labels += [label] * len(by_folder[folder])
  return paths, labels, class_names, left_out_notes(root, others, hidden)


def _printable(name: str) -> str:
  return name.encode('utf-8', 'surrogateescape').decode('utf-8', 'backslashreplace')


def _read_csv_rows(csv_path: pathlib.Path, required: list[str]):
  """(rows, line numbers): the line each row ends on, for messages."""
  rows, lines = [], []
  try:
    # utf-8-sig: spreadsheet exports often start with a byte-order mark.
    with csv_path.open(newline='', encoding='utf-8-sig') as handle:
      reader = csv.DictReader(handle)
      columns = reader.fieldnames or []
      for row in reader:
        if None in row.values():
          raise DataError(f'{csv_path}: line {reader.line_num} has fewer cells than the header '
                          f'{columns}.')
        # DictReader's key for cells beyond the header's; empty ones (a trailing comma
        # of a spreadsheet export) hold nothing to lose.
        if any(cell.strip() for cell in row.pop(None, [])):
          raise DataError(f'{csv_path}: line {reader.line_num} has more cells than the header '
                          f'{columns}; quote a value that holds a comma.')
        rows.append(row)
        lines.append(reader.line_num)
  except (OSError, UnicodeDecodeError, csv.Error) as error:
    raise DataError(f'{csv_path}: not a readable UTF-8 CSV ({error}).') from None
  repeated = sorted({c for c in columns if columns.count(c) > 1})
  if repeated:
    raise DataError(f'{csv_path}: duplicate column(s) {repeated} in the header.')
  missing = [c for c in required if c not in columns]
  if missing:
    raise DataError(f'{csv_path}: missing column(s) {missing}; found {columns}.')
  if not rows:
    raise DataError(f'{csv_path}: no rows.')
  return rows, lines


def _check_unique(values, csv_path, what):
  seen, duplicates = set(), []
  for value in values:
    if value in seen:
      duplicates.append(value)
    seen.add(value)
  if duplicates:
    raise DataError(f'{csv_path}: duplicate {what} {duplicates[:5]}; each image must appear once.')


def read_path_label_csv(csv_path: pathlib.Path):
  """(paths, labels, class names) from a CSV with columns path,label."""
  rows, lines = _read_csv_rows(csv_path, ['path', 'label'])
  raw_labels = [row['label'].strip() for row in rows]
  for what, values in (('label', raw_labels), ('path', [row['path'].strip() for row in rows])):
    if '' in values:
      raise DataError(f'{csv_path}: empty {what} on line {lines[values.index("")]}.')
  # The same file under two spellings ('a.png', './a.png') is a duplicate too.
  _check_unique([os.path.normpath(row['path']) for row in rows], csv_path, 'path(s)')
  numeric = lambda s: s.isascii() and s.isdigit()  # noqa: E731 ('²'.isdigit() is True)
  names = sorted(set(raw_labels), key=lambda s: (not numeric(s), int(s) if numeric(s) else 0, s))
  index = {name: i for i, name in enumerate(names)}
  paths = [csv_path.parent / row['path'] for row in rows]
  return paths, [index[label] for label in raw_labels], names


def read_isic_csv(csv_path: pathlib.Path, image_dir: pathlib.Path):
  """(paths, labels, class names, notes) from an ISIC ground-truth CSV (one-hot columns)."""
  rows, lines = _read_csv_rows(csv_path, ['image'])
  columns = [c for c in rows[0].keys() if c != 'image']
  try:
    onehot = np.asarray([[float(row[c]) for c in columns] for row in rows])
  except (TypeError, ValueError):
    raise DataError(f'{csv_path}: class columns {columns} must hold 0/1 values.') from None
  notes = []
  # ISIC 2019's UNK ('none of the others') column is empty in the training data.
  empty = [c for i, c in enumerate(columns) if (onehot[:, i] == 0).all()]
  if 'UNK' in empty:
    keep = [i for i, c in enumerate(columns) if c != 'UNK']
    columns, onehot = [columns[i] for i in keep], onehot[:, keep]
    notes.append(f'{csv_path.name}: dropped the empty UNK column.')
  per_row = onehot.sum(axis=1)
  bad = np.flatnonzero((per_row != 1) | ~np.isin(onehot, (0, 1)).all(axis=1))
  if len(bad):
    raise DataError(f'{csv_path}: line {lines[bad[0]]} ({rows[bad[0]]["image"]}) must have exactly '
                    f'one class set to 1 ({len(bad)} such row(s)).')
  _check_unique([row['image'] for row in rows], csv_path, 'image id(s)')
  paths = []
  for row in rows:
    matches = [image_dir / f'{row["image"]}{s}' for s in ('.jpg', '.jpeg', '.png')]
    found = next((p for p in matches if p.is_file()), None)
    paths.append(found or matches[0])
  return paths, onehot.argmax(axis=1).tolist(), columns, tuple(notes)


def read_groups_csv(csv_path: pathlib.Path, image_ids) -> tuple[np.ndarray, tuple[str, ...]]:
  """(group of each of `image_ids`, notes) from a CSV with columns image,lesion_id (ISIC's
  metadata file as published). An image the file does not list, or lists with an
  empty lesion_id, is a group of its own."""
  rows, _ = _read_csv_rows(csv_path, ['image', 'lesion_id'])
  _check_unique([row['image'] for row in rows], csv_path, 'image id(s)')
  lesion = {row['image']: (row['lesion_id'] or '').strip() for row in rows}
  groups = [lesion.get(image) or f'image:{image}' for image in image_ids]
  alone = sum(not lesion.get(image) for image in image_ids)
  notes = (f'{csv_path.name}: {alone} image(s) without a lesion_id, each its own group.',) \
      if alone else ()
  return np.asarray(groups), notes
