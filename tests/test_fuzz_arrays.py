"""Fuzzing the array readers (MedMNIST .npz, IDX): read exactly, or one DataError naming the file.

Hypothesis writes small, often malformed, files and checks each reader against an independent
model of what the files hold: a read must give exactly the labels, pixels and class names
written; a refusal must be a single DataError whose message names the offending file; anything
else (another exception type, a hang, wrong counts) fails. The regression tests at the end pin
one minimal case of each reader bug the fuzzing found.
"""

import gzip
import io
import json
import math
import pathlib
import re
import struct
import tempfile

import numpy as np
import pytest

pytest.importorskip('hypothesis')
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fuzz_helpers import (FUZZ, PARTS, all_pixels, attempt, cfg, mutated_bytes,  # noqa: E402
                          refuses, write)
from imbal_jax.data import readers  # noqa: E402
from imbal_jax.data.sources import DataError  # noqa: E402

# ---------------------------------------------------------------------------------------------
# MedMNIST .npz: random key sets, shapes, dtypes, labels and class-name sidecars.

GOOD_IMAGE_SHAPES = ((2, 3), (3, 2, 1), (2, 2, 3), (1, 1, 3))  # per image: h,w | h,w,1 | h,w,3
NPZ_DEFECTS = {
    'image_dtype': ('int64', 'float32', 'bool', 'uint16'),
    'image_shape': ((2, 2, 4), (2, 2, 2), (3,), (), (1, 1, 1, 3)),
    'label_dtype': ('float64', 'float32', 'bool'),
    'label_layout': ('n2', 'scalar', 'n11'),
    'label_count': (1, -1, 2),
    # Beyond the class limit without a class list (10**6) and beyond int32 (2**31, 2**32 + 1).
    'label_value': (-1, -2, 7, 255, 10**6, 2**31, 2**32 + 1),
    'drop': ('images', 'labels'),
    'orphan': ('val', 'test'),  # {part}_labels without {part}_images
}


@st.composite
def npz_arrays(draw):
  """A valid MedMNIST layout with zero to two defects drawn from NPZ_DEFECTS."""
  spec = {}
  for part in PARTS:
    if part == 'train' or draw(st.integers(0, 9)) < 7:
      count = draw(st.integers(0, 4))
      spec[part] = {'count': count, 'shape': draw(st.sampled_from(GOOD_IMAGE_SHAPES)),
                    'image_dtype': 'uint8', 'images': True, 'labels': True,
                    'label_dtype': draw(st.sampled_from(['int64', 'int32', 'uint8', 'int16'])),
                    'layout': draw(st.sampled_from(['n', 'n1'])),
                    'values': draw(st.lists(st.integers(0, 3), min_size=count, max_size=count)),
                    'seed': draw(st.integers(0, 2**16))}
  orphans = []
  for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2]))):
    defect = draw(st.sampled_from(sorted(NPZ_DEFECTS)))
    value = draw(st.sampled_from(NPZ_DEFECTS[defect]))
    part = spec[draw(st.sampled_from(sorted(spec)))]
    if defect in ('image_dtype', 'image_shape', 'label_dtype'):
      part[{'image_shape': 'shape'}.get(defect, defect)] = value
    elif defect == 'label_layout':
      part['layout'] = value
    elif defect == 'label_count':
      part['values'] = (part['values'] + [0] * value)[:max(0, len(part['values']) + value)]
    elif defect == 'label_value' and part['values']:
      part['values'][draw(st.integers(0, len(part['values']) - 1))] = value
    elif defect == 'drop':
      part[value] = False
    elif defect == 'orphan' and value not in spec:
      orphans.append(value)
  arrays = {}
  for name, part in spec.items():
    if part['images']:
      rng = np.random.default_rng(part['seed'])
      shape = (part['count'],) + part['shape']
      arrays[f'{name}_images'] = rng.integers(0, 256, shape).astype(part['image_dtype'])
    if part['labels']:
      arrays[f'{name}_labels'] = label_array(part['values'], part['layout'], part['label_dtype'])
  for name in orphans:
    arrays[f'{name}_labels'] = label_array([0, 1], 'n', 'int64')
  return arrays


def label_array(values, layout, dtype):
  labels = np.asarray(values, np.int64)
  labels = {'n': labels, 'n1': labels[:, None], 'n2': np.stack([labels, labels], 1),
            'n11': labels[:, None, None], 'scalar': np.asarray(values[0] if values else 0)}[layout]
  return labels.astype(dtype)  # a value beyond a small dtype wraps: the model sees what is stored


NAME_POOL = ('nv', 'mel', 'bcc', 'akiec', 'df', 'vasc', 'bkl', 'other')
# None, or a class list: usually long enough for the labels, sometimes too short.
sidecars = st.none() | st.tuples(st.sampled_from(['json', 'txt']),
                                 st.sampled_from([list(NAME_POOL)] * 3 + [list(NAME_POOL[:k])
                                                                          for k in range(8)]))


def write_sidecar(path, sidecar):
  if sidecar is None:
    return None
  kind, names = sidecar
  if kind == 'json':
    path.with_suffix('.json').write_text(json.dumps({'classes': names}))
  else:
    (path.parent / 'classes.txt').write_text(''.join(f'{n}\n\n' for n in names))
  return list(names)


def medmnist_model(arrays, names):
  """What the file holds: (parts {part: (images nhwc, labels)}, class names) or None."""
  keys = set(arrays)
  parts = [p for p in PARTS if f'{p}_images' in keys]
  orphans = [p for p in PARTS if f'{p}_labels' in keys and f'{p}_images' not in keys]
  if 'train' not in parts or orphans or any(f'{p}_labels' not in keys for p in parts):
    return None
  held = {}
  for part in parts:
    images, labels = arrays[f'{part}_images'], arrays[f'{part}_labels']
    images = images[..., None] if images.ndim == 3 else images
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
      return None
    labels = labels[:, 0] if labels.ndim == 2 and labels.shape[1] == 1 else labels
    if (labels.ndim != 1 or len(labels) != len(images)
        or not np.issubdtype(labels.dtype, np.integer) or (len(labels) and labels.min() < 0)
        or (len(labels) and int(labels.max()) > np.iinfo(np.int32).max)):
      return None
    held[part] = (images, labels)
  filled = [labels for _, labels in held.values() if len(labels)]
  if not filled:  # nothing to learn from
    return None
  highest = max(int(labels.max()) for labels in filled) + 1
  if names is None and highest > readers.MAX_CLASSES:  # a corrupt label, not a class
    return None
  if names is not None and len(names) < highest:
    return None
  class_names = tuple(names) if names is not None else tuple(str(c) for c in range(highest))
  return held, class_names


@FUZZ
@given(arrays=npz_arrays(), sidecar=sidecars)
def test_medmnist_npz_fuzz(arrays, sidecar):
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / 'fuzz.npz'
    np.savez(path, **arrays)
    want = medmnist_model(arrays, write_sidecar(path, sidecar))
    got, message = attempt('medmnist', cfg(data_path=str(path)))
    if want is None:
      assert message is not None, f'read a malformed file: keys {sorted(arrays)}'
      assert str(path) in message, message
      return
    assert message is None, message
    held, class_names = want
    assert got.class_names == class_names
    assert set(got.parts) == set(held)
    for part, (images, labels) in held.items():
      np.testing.assert_array_equal(all_pixels(got, part), images)
      assert got.parts[part].labels.dtype == np.int32
      np.testing.assert_array_equal(got.parts[part].labels, labels)


def valid_npz_bytes():
  buffer = io.BytesIO()
  rng = np.random.default_rng(7)
  arrays = {}
  for part, count in zip(PARTS, (6, 2, 3)):
    arrays[f'{part}_images'] = rng.integers(0, 256, (count, 3, 3), dtype=np.uint8)
    arrays[f'{part}_labels'] = (np.arange(count) % 3)[:, None]
  np.savez(buffer, **arrays)
  return buffer.getvalue(), arrays


NPZ_BYTES, NPZ_ARRAYS = valid_npz_bytes()


@FUZZ
@given(data=mutated_bytes(NPZ_BYTES))
def test_medmnist_corrupt_bytes_fuzz(data):
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / 'fuzz.npz'
    path.write_bytes(data)
    got, message = attempt('medmnist', cfg(data_path=str(path)))
    if message is not None:
      assert str(path) in message, message
      return
    # Zip CRCs catch any change to array data, and a renamed member leaves a part without its
    # images or labels: whatever reads must be exactly what was written.
    assert got.class_names == ('0', '1', '2')
    assert set(got.parts) == set(PARTS)
    for part in PARTS:
      np.testing.assert_array_equal(all_pixels(got, part)[..., 0], NPZ_ARRAYS[f'{part}_images'])
      np.testing.assert_array_equal(got.parts[part].labels, NPZ_ARRAYS[f'{part}_labels'][:, 0])


# ---------------------------------------------------------------------------------------------
# IDX (MNIST layout): random headers, truncation, wrong magic, gz and plain, count mismatches.

def idx_bytes(array):
  return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f'>{array.ndim}I', *array.shape) + (
      array.astype(np.uint8).tobytes())


def reference_idx(data, compressed):
  """The array an IDX file holds, by the format's definition (exact integers), or None."""
  if compressed:
    try:
      data = gzip.decompress(data)
    except Exception:  # noqa: BLE001 -- any failure: not a usable file
      return None
  if len(data) < 4 or data[:3] != b'\0\0\x08':
    return None
  ndim = data[3]
  header = 4 + 4 * ndim
  if len(data) < header:
    return None
  shape = struct.unpack(f'>{ndim}I', data[4:header])
  if len(data) - header != math.prod(shape):
    return None
  return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


IDX_DEFECTS = ('magic', 'cut', 'extend', 'random', 'ndim', 'overflow', 'zero_d', 'bad_shape',
               'count', 'missing', 'corrupt_gz')


@st.composite
def idx_file(draw, array, defect):
  """(plain bytes or None, gz bytes or None) for an IDX file meant to hold `array`."""
  if defect == 'bad_shape':
    flat = array.reshape(array.shape[0], int(np.prod(array.shape[1:])))
    array = flat if array.ndim > 2 else np.concatenate([flat, flat], 1)  # images 2-d; labels (n, 2)
  elif defect == 'count':
    array = array[1:] if len(array) else np.zeros((1,) + array.shape[1:], np.uint8)
  raw = idx_bytes(array)
  if defect == 'magic':
    raw = draw(st.binary(min_size=3, max_size=3)) + raw[3:]
  elif defect == 'cut':
    raw = raw[:draw(st.integers(0, len(raw) - 1))]
  elif defect == 'extend':
    raw += draw(st.binary(min_size=1, max_size=5))
  elif defect == 'random':
    raw = draw(st.binary(max_size=30))
  elif defect == 'ndim':
    raw = raw[:3] + bytes([draw(st.integers(0, 6))]) + raw[4:]
  elif defect == 'overflow':  # 65536**4 == 2**64: wraps to 0 in int64
    raw = bytes([0, 0, 0x08, 4]) + struct.pack('>4I', *(65536,) * 4)
  elif defect == 'zero_d':
    raw = bytes([0, 0, 0x08, 0, 7])
  if defect == 'missing':
    return None, None
  # 'both': the reader must prefer the plain file and ignore a broken .gz beside it.
  store = draw(st.sampled_from(['plain', 'gz', 'both'] if defect != 'corrupt_gz' else ['gz']))
  packed = gzip.compress(raw, mtime=0)
  if defect == 'corrupt_gz' or store == 'both':
    packed = draw(mutated_bytes(packed))
  return (raw if store in ('plain', 'both') else None,
          packed if store in ('gz', 'both') else None)


IDX_STEMS = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte',
             't10k-labels-idx1-ubyte')


@st.composite
def idx_dataset(draw):
  """Valid MNIST-layout files with zero to two defects drawn from IDX_DEFECTS."""
  defects = {}
  for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2]))):
    defects[draw(st.sampled_from(IDX_STEMS))] = draw(st.sampled_from(IDX_DEFECTS))
  files = {}
  for prefix in ('train', 't10k'):
    count = draw(st.integers(0, 4))
    shape = draw(st.sampled_from([(2, 3), (2, 2), (1, 2, 1), (2, 1, 3)]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    images = rng.integers(0, 256, (count,) + shape, dtype=np.uint8)
    labels = np.asarray(draw(st.lists(st.integers(0, 5), min_size=count, max_size=count)),
                        np.uint8)
    if draw(st.integers(0, 5)) == 0:
      labels = labels[:, None]
    for stem, array in ((f'{prefix}-images-idx3-ubyte', images),
                        (f'{prefix}-labels-idx1-ubyte', labels)):
      files[stem] = draw(idx_file(array, defects.get(stem)))
  return files


def idx_model(files):
  """(parts, class names) the folder holds, and the stems of the files implicated if it fails."""
  parts, implicated = {}, set()
  for part, prefix in (('train', 'train'), ('test', 't10k')):
    loaded = {}
    for kind in ('images', 'labels'):
      stem = f'{prefix}-{kind}-idx{3 if kind == "images" else 1}-ubyte'
      plain, packed = files[stem]
      # The reader prefers the plain file when both exist.
      loaded[kind] = (reference_idx(plain, False) if plain is not None else
                      reference_idx(packed, True) if packed is not None else None)
    images, labels = loaded['images'], loaded['labels']
    if labels is not None and labels.ndim == 2 and labels.shape[1] == 1:
      labels = labels[:, 0]
    images = images[..., None] if images is not None and images.ndim == 3 else images
    if (images is None or images.ndim != 4 or images.shape[-1] not in (1, 3) or labels is None
        or labels.ndim != 1 or len(labels) != len(images)):
      implicated |= {f'{prefix}-images-idx3-ubyte', f'{prefix}-labels-idx1-ubyte'}
    else:
      parts[part] = (images, labels)
  if implicated or not any(len(labels) for _, labels in parts.values()):
    return None, implicated
  highest = max(int(labels.max()) for _, labels in parts.values() if len(labels)) + 1
  return (parts, tuple(str(c) for c in range(highest))), implicated


@FUZZ
@given(files=idx_dataset())
def test_idx_fuzz(files):
  with tempfile.TemporaryDirectory() as tmp:
    directory = pathlib.Path(tmp) / 'mnist'
    directory.mkdir()
    for stem, (plain, packed) in files.items():
      if plain is not None:
        (directory / stem).write_bytes(plain)
      if packed is not None:
        (directory / f'{stem}.gz').write_bytes(packed)
    want, implicated = idx_model(files)
    got, message = attempt('idx', cfg(data_path=str(directory)))
    if want is None:
      assert message is not None, f'read a malformed IDX set: {implicated}'
      named = message.split(': ', 1)[0]
      if not implicated:  # every file fine but no labels at all: the folder is to blame
        assert named == str(directory), message
      elif named == str(directory):  # a missing file, named in the message
        assert any(f'no {stem} or {stem}.gz' in message for stem in implicated), message
      else:  # the file (plain or .gz) at fault, never just the folder
        assert named in {str(directory / s) + gz for s in implicated for gz in ('', '.gz')}, (
            implicated, message)
      return
    assert message is None, message
    parts, class_names = want
    assert got.class_names == class_names and set(got.parts) == {'train', 'test'}
    for part, (images, labels) in parts.items():
      np.testing.assert_array_equal(all_pixels(got, part), images)
      np.testing.assert_array_equal(got.parts[part].labels, labels)


# ---------------------------------------------------------------------------------------------
# Regression tests: one minimal case of each array-reader bug the fuzzing found.

def small_npz(path, **arrays):
  np.savez(path, **{'train_images': np.zeros((2, 3, 3), np.uint8),
                    'train_labels': np.array([0, 1]), **arrays})
  return path


def idx_folder(directory, **replace):
  directory.mkdir(exist_ok=True)
  files = {'train-images-idx3-ubyte': idx_bytes(np.zeros((2, 2, 2), np.uint8)),
           'train-labels-idx1-ubyte': idx_bytes(np.array([0, 1], np.uint8)),
           't10k-images-idx3-ubyte': idx_bytes(np.zeros((1, 2, 2), np.uint8)),
           't10k-labels-idx1-ubyte': idx_bytes(np.array([1], np.uint8)), **replace}
  for name, data in files.items():
    write(directory / name, data)
  return directory


# Guards against: an .npy file named .npz crashing on `with archive:` (an ndarray).
def test_npy_file_named_npz_is_refused(tmp_path):
  buffer = io.BytesIO()
  np.save(buffer, np.zeros(3))
  path = write(tmp_path / 'data.npz', buffer.getvalue())
  refuses(lambda: readers.medmnist(cfg(data_path=str(path))), path)


# Guards against: a corrupt .npz member (here a bad CRC) escaping as BadZipFile on access.
def test_npz_member_with_bad_crc_is_refused(tmp_path):
  data = bytearray(NPZ_BYTES)
  data[100] ^= 0xFF  # inside train_images.npy's data
  path = write(tmp_path / 'data.npz', bytes(data))
  refuses(lambda: readers.medmnist(cfg(data_path=str(path))), path)


# Guards against: an object (pickled) array escaping as "Object arrays cannot be loaded".
def test_npz_object_array_is_refused(tmp_path):
  path = small_npz(tmp_path / 'data.npz', train_labels=np.array([0, None], dtype=object))
  refuses(lambda: readers.medmnist(cfg(data_path=str(path))), path)


# Guards against: no labels in any part crashing on max() of nothing.
def test_no_labels_in_any_part_is_refused(tmp_path):
  path = small_npz(tmp_path / 'data.npz', train_images=np.zeros((0, 3, 3), np.uint8),
                   train_labels=np.zeros(0, np.int64))
  refuses(lambda: readers.medmnist(cfg(data_path=str(path))), path)
  directory = tmp_path / 'mnist'
  empty = {s: idx_bytes(np.zeros((0, 2, 2) if 'images' in s else 0, np.uint8)) for s in IDX_STEMS}
  idx_folder(directory, **empty)
  refuses(lambda: readers.idx(cfg(data_path=str(directory))), directory)


# Guards against: labels beyond int32 wrapping (2**32+1 -> 1, 2**31 -> negative) and a huge
# label making a million (or 2**31) class names.
@pytest.mark.parametrize('label', [2**32 + 1, 2**31, 10**6])
def test_huge_labels_are_refused(tmp_path, label):
  path = small_npz(tmp_path / 'data.npz', train_labels=np.array([0, label], np.int64))
  refuses(lambda: readers.medmnist(cfg(data_path=str(path))), path)


# Guards against: a broken class-name sidecar escaping as JSONDecodeError, AttributeError or
# UnicodeDecodeError instead of a DataError naming the sidecar.
@pytest.mark.parametrize('sidecar,content', [('data.json', b'{"classes": [1,'),
                                             ('data.json', b'["a", "b"]'),
                                             ('data.json', b'\xff\xfe'),
                                             ('classes.txt', b'caf\xe9\n')])
def test_broken_class_name_sidecar_is_refused_by_name(tmp_path, sidecar, content):
  path = small_npz(tmp_path / 'data.npz')
  write(tmp_path / sidecar, content)
  refuses(lambda: readers.medmnist(cfg(data_path=str(path))), tmp_path / sidecar)


# Guards against: val_labels without val_images being ignored (val then carved from train).
def test_orphaned_part_labels_are_refused(tmp_path):
  path = small_npz(tmp_path / 'data.npz', val_labels=np.array([0, 1]))
  with pytest.raises(DataError, match=re.escape(str(path)) + '.*val_images'):
    readers.medmnist(cfg(data_path=str(path)))


# Guards against: corrupt deflate data in an IDX .gz escaping as zlib.error.
def test_idx_gz_with_corrupt_deflate_is_refused(tmp_path):
  packed = bytearray(gzip.compress(idx_bytes(np.arange(64, dtype=np.uint8).reshape(4, 4, 4)),
                                   mtime=0))
  packed[15] ^= 0xFF
  directory = idx_folder(tmp_path / 'mnist')
  (directory / 'train-images-idx3-ubyte').unlink()
  path = write(directory / 'train-images-idx3-ubyte.gz', bytes(packed))
  refuses(lambda: readers.idx(cfg(data_path=str(directory))), path)


# Guards against: an IDX header of 65536**4 wrapping np.prod to 0, then failing reshape.
def test_idx_header_size_overflow_is_refused(tmp_path):
  directory = idx_folder(tmp_path / 'mnist', **{
      'train-images-idx3-ubyte': bytes([0, 0, 8, 4]) + struct.pack('>4I', *(65536,) * 4)})
  refuses(lambda: readers.idx(cfg(data_path=str(directory))),
          directory / 'train-images-idx3-ubyte')


# Guards against: 0-d IDX images crashing on len() of an unsized object.
def test_zero_dimensional_idx_images_are_refused(tmp_path):
  directory = idx_folder(tmp_path / 'mnist', **{'train-images-idx3-ubyte': bytes([0, 0, 8, 0, 7])})
  refuses(lambda: readers.idx(cfg(data_path=str(directory))),
          directory / 'train-images-idx3-ubyte')


# Guards against: a bad IDX image shape being reported against the folder, not the file.
def test_idx_image_shape_error_names_the_file(tmp_path):
  directory = idx_folder(tmp_path / 'mnist', **{
      'train-images-idx3-ubyte': idx_bytes(np.zeros((2, 4), np.uint8))})
  refuses(lambda: readers.idx(cfg(data_path=str(directory))),
          directory / 'train-images-idx3-ubyte')


def npz_with_merged_entries():
  """NPZ_BYTES with one byte changed: the central-directory name length of val_images.npy
  grows from 14 to 74, so its name swallows the next entry (val_labels.npy) whole."""
  data = bytearray(NPZ_BYTES)
  start = data.rindex(b'PK\x01\x02', 0, data.rindex(b'val_images.npy'))
  name, extra, comment = struct.unpack('<HHH', data[start + 28:start + 34])
  assert (name, extra, comment) == (14, 0, 0)
  after_next = data.index(b'PK\x01\x02', data.index(b'PK\x01\x02', start + 4) + 4)
  data[start + 28:start + 30] = struct.pack('<H', after_next - (start + 46))
  return bytes(data)


# NEW (found by IMBAL_FUZZ_EXAMPLES=3000 on test_medmnist_corrupt_bytes_fuzz; readers not changed
# here): zipfile ignores the end record's entry count, so the .npz lists train_images,
# train_labels, test_images, test_labels and one junk key 'val_images.npyPK\x01\x02...val_labels';
# medmnist ignores the unknown key and silently reads the file without its val part.
# Guards against: a corrupt zip directory merging two entries, so a part vanishes silently.
def test_npz_with_merged_central_directory_entries_is_refused(tmp_path):
  path = write(tmp_path / 'data.npz', npz_with_merged_entries())
  refuses(lambda: readers.medmnist(cfg(data_path=str(path))), path)
