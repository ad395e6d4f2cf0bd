"""Readers on small files written here: good files read exactly, bad ones give one clear error."""

import functools
import gzip
import json
import struct

import ml_collections
import numpy as np
import pytest
from PIL import Image

from imbal_jax import prepare
from imbal_jax.data import readers, sources
from imbal_jax.data.sources import DataError


def cfg(**fields):
  base = dict(data_path='', labels_csv='', image_size=0, skip_corrupt=False, tfds_name='',
              data_dir='')
  base.update(fields)
  return ml_collections.ConfigDict(base)


def write_npz(path, rgb=True, n=(30, 6, 9), classes=3, **overrides):
  rng = np.random.default_rng(0)
  arrays = {}
  for part, count in zip(('train', 'val', 'test'), n):
    shape = (count, 8, 8, 3) if rgb else (count, 8, 8)
    arrays[f'{part}_images'] = rng.integers(0, 256, size=shape, dtype=np.uint8)
    arrays[f'{part}_labels'] = (np.arange(count) % classes).reshape(-1, 1)
  arrays.update(overrides)
  arrays = {k: v for k, v in arrays.items() if v is not None}
  np.savez(path, **arrays)
  return arrays


def test_medmnist_npz_reads_every_split_exactly(tmp_path):
  arrays = write_npz(tmp_path / 'toy.npz', rgb=False)
  source = readers.medmnist(cfg(data_path=str(tmp_path / 'toy.npz')))
  assert source.class_names == ('0', '1', '2')
  for part in ('train', 'val', 'test'):
    split = source.parts[part]
    np.testing.assert_array_equal(split.take(np.arange(len(split)))[..., 0],
                                  arrays[f'{part}_images'])
    np.testing.assert_array_equal(split.labels, arrays[f'{part}_labels'][:, 0])


def test_medmnist_class_names_from_sidecar(tmp_path):
  write_npz(tmp_path / 'skin.npz')
  (tmp_path / 'skin.json').write_text(json.dumps({'classes': ['nv', 'mel', 'df']}))
  assert readers.medmnist(cfg(data_path=str(tmp_path / 'skin.npz'))).class_names == (
      'nv', 'mel', 'df')
  (tmp_path / 'skin.json').write_text(json.dumps({'classes': ['nv', 'mel']}))
  with pytest.raises(DataError, match='labels go up to 2 but the class-name metadata lists only 2'):
    readers.medmnist(cfg(data_path=str(tmp_path / 'skin.npz')))


@pytest.mark.parametrize('overrides,message', [
    ({'train_labels': None}, r"missing key\(s\) \['train_labels'\]"),
    ({'val_images': np.zeros((6, 8), np.uint8)}, r'\[val_images\].*shape \(6, 8\)'),
    ({'train_images': np.zeros((30, 8, 8), np.float32)}, 'must be uint8'),
    ({'test_labels': np.zeros((9, 14), np.int64)}, 'multi-label'),
    ({'train_labels': np.zeros(29, np.int64)}, '30 images but 29 labels'),
    ({'train_labels': -np.ones(30, np.int64)}, 'negative label'),
])
def test_medmnist_bad_files_name_the_problem(tmp_path, overrides, message):
  write_npz(tmp_path / 'bad.npz', **overrides)
  with pytest.raises(DataError, match=message):
    readers.medmnist(cfg(data_path=str(tmp_path / 'bad.npz')))


def test_medmnist_missing_and_unreadable_files(tmp_path):
  with pytest.raises(DataError, match=r"nope.npz' does not exist; set it"):  # absolute
    readers.medmnist(cfg(data_path=str(tmp_path / 'nope.npz')))
  # A relative path names the directory it is relative to.
  with pytest.raises(DataError, match=r"'no/such.npz' does not exist \(relative to the current "
                                      r'directory /'):
    readers.medmnist(cfg(data_path='no/such.npz'))
  (tmp_path / 'junk.npz').write_bytes(b'not a zip file')
  with pytest.raises(DataError, match='junk.npz: not a readable .npz'):
    readers.medmnist(cfg(data_path=str(tmp_path / 'junk.npz')))


def test_official_medmnist_name_with_other_content_is_flagged(tmp_path):
  write_npz(tmp_path / 'dermamnist_64.npz')
  source = readers.medmnist(cfg(data_path=str(tmp_path / 'dermamnist_64.npz')))
  assert any('differs from the published b70a2f5635c6199aeaa28c31d7202e1f' in n
             for n in source.notes)
  write_npz(tmp_path / 'mydata.npz')
  assert readers.medmnist(cfg(data_path=str(tmp_path / 'mydata.npz'))).notes == ()


def write_idx(path, array, compress):
  header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f'>{array.ndim}I', *array.shape)
  payload = header + array.astype(np.uint8).tobytes()
  if compress:
    path = path.with_name(path.name + '.gz')
    payload = gzip.compress(payload)
  path.write_bytes(payload)
  return path


@pytest.mark.parametrize('compress', [False, True])
def test_idx_reads_train_and_test(tmp_path, compress):
  rng = np.random.default_rng(1)
  arrays = {}
  for prefix, n in (('train', 40), ('t10k', 12)):
    arrays[prefix] = (rng.integers(0, 256, (n, 5, 5), dtype=np.uint8), np.arange(n) % 4)
    write_idx(tmp_path / f'{prefix}-images-idx3-ubyte', arrays[prefix][0], compress)
    write_idx(tmp_path / f'{prefix}-labels-idx1-ubyte', arrays[prefix][1], compress)
  source = readers.idx(cfg(data_path=str(tmp_path)))
  assert set(source.parts) == {'train', 'test'} and source.balanced
  np.testing.assert_array_equal(source.parts['test'].take(np.arange(12))[..., 0], arrays['t10k'][0])
  np.testing.assert_array_equal(source.parts['train'].labels, arrays['train'][1])


def test_idx_truncated_and_missing_files(tmp_path):
  images = np.zeros((10, 4, 4), np.uint8)
  path = write_idx(tmp_path / 'train-images-idx3-ubyte', images, compress=False)
  path.write_bytes(path.read_bytes()[:-7])
  write_idx(tmp_path / 'train-labels-idx1-ubyte', np.zeros(10, np.uint8), compress=False)
  with pytest.raises(DataError, match='train-images-idx3-ubyte: header says shape'):
    readers.idx(cfg(data_path=str(tmp_path)))
  write_idx(tmp_path / 'train-images-idx3-ubyte', images, compress=False)
  with pytest.raises(DataError, match='no t10k-images-idx3-ubyte'):
    readers.idx(cfg(data_path=str(tmp_path)))


def write_png(path, colour, size=(12, 9)):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new('RGB', size, colour).save(path)


def make_folder_tree(root):
  for i in range(3):
    write_png(root / 'upper' / 'polyp' / f'p{i}.png', (200, 0, 0))
    write_png(root / 'lower' / 'polyp' / f'q{i}.png', (0, 200, 0))
    write_png(root / 'ulcer' / f'u{i}.jpg', (0, 0, 200))
  (root / 'ulcer' / 'notes.txt').write_text('ignored: not an image')


def test_folder_nested_classes_decode_and_resize(tmp_path):
  make_folder_tree(tmp_path / 'data')
  source = readers.folder(cfg(data_path=str(tmp_path / 'data'), image_size=6))
  # 'polyp' appears twice, so names are paths relative to the root.
  assert source.class_names == ('lower/polyp', 'ulcer', 'upper/polyp')
  train = source.parts['train']
  images = train.take(np.arange(len(train)))
  assert images.shape == (9, 6, 6, 3) and np.bincount(train.labels).tolist() == [3, 3, 3]
  assert np.all(images[train.labels == 0][..., 1] > 150)  # green class stays green


def test_folder_corrupt_image_named_or_skipped_and_counted(tmp_path):
  make_folder_tree(tmp_path / 'data')
  (tmp_path / 'data' / 'ulcer' / 'broken.jpg').write_bytes(b'\xff\xd8 truncated')
  with pytest.raises(DataError, match=r'1 image\(s\) cannot be read:\n  .*broken.jpg'):
    readers.folder(cfg(data_path=str(tmp_path / 'data'), image_size=6))
  source = readers.folder(cfg(data_path=str(tmp_path / 'data'), image_size=6, skip_corrupt=True))
  assert len(source.parts['train']) == 9
  assert source.notes[0].startswith('left out 1 file(s) without an image suffix')
  assert len(source.notes) == 2 and 'broken.jpg' in source.notes[1]


def test_folder_layout_errors(tmp_path):
  write_png(tmp_path / 'flat' / 'a.png', (1, 2, 3))
  with pytest.raises(DataError, match='images lie directly in the data folder'):
    readers.folder(cfg(data_path=str(tmp_path / 'flat'), image_size=4))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(DataError, match='no image files'):
    readers.folder(cfg(data_path=str(tmp_path / 'empty'), image_size=4))
  make_folder_tree(tmp_path / 'data')
  with pytest.raises(DataError, match='config.image_size must be set'):
    readers.folder(cfg(data_path=str(tmp_path / 'data')))


def test_folder_names_files_it_leaves_out_and_refuses_a_class_of_no_images(tmp_path):
  make_folder_tree(tmp_path / 'data')
  (tmp_path / 'data' / 'ulcer' / 'scan.dcm').write_bytes(b'DICM')
  (tmp_path / 'data' / 'readme.txt').write_text('about the data')
  source = readers.folder(cfg(data_path=str(tmp_path / 'data'), image_size=4))
  assert len(source.parts['train']) == 9
  [note] = source.notes
  assert note.startswith('left out 3 file(s) without an image suffix')
  assert all(name in note for name in ('readme.txt', 'ulcer/notes.txt', 'ulcer/scan.dcm'))
  # A folder of DICOM files only would have been a class lost without a word.
  (tmp_path / 'data' / 'rare').mkdir()
  (tmp_path / 'data' / 'rare' / 'a.dcm').write_bytes(b'DICM')
  (tmp_path / 'data' / 'rare' / '.DS_Store').write_bytes(b'')
  with pytest.raises(DataError, match=r'data/rare: holds files \(.dcm\) but no image'):
    readers.folder(cfg(data_path=str(tmp_path / 'data'), image_size=4))


def test_folder_leaves_out_hidden_files_and_macos_zip_copies(tmp_path):
  make_folder_tree(tmp_path / 'data')
  # A zip made on macOS: __MACOSX/ holds a '._' copy of every file, not an image.
  for name in ('u0.jpg', 'u1.jpg'):
    (tmp_path / 'data' / '__MACOSX' / 'ulcer').mkdir(parents=True, exist_ok=True)
    (tmp_path / 'data' / '__MACOSX' / 'ulcer' / f'._{name}').write_bytes(b'\x00\x05\x16\x07')
  (tmp_path / 'data' / 'ulcer' / '._u0.jpg').write_bytes(b'\x00\x05\x16\x07')
  (tmp_path / 'data' / '.thumbnails' / 'x').mkdir(parents=True)
  (tmp_path / 'data' / '.thumbnails' / 'x' / 'a.png').write_bytes(b'png?')
  source = readers.folder(cfg(data_path=str(tmp_path / 'data'), image_size=4))
  assert source.class_names == ('lower/polyp', 'ulcer', 'upper/polyp')
  assert len(source.parts['train']) == 9
  assert any(note.startswith('left out 4 hidden file(s)') for note in source.notes)


def test_csv_rows_with_more_cells_than_the_header_are_refused_by_line(tmp_path):
  for i in range(3):
    write_png(tmp_path / 'img' / f'{i}.png', (i * 50, 0, 0))
  # A trailing comma (empty extra cells) is harmless; a value would be lost.
  (tmp_path / 'trailing.csv').write_text('path,label\nimg/0.png,a,\nimg/1.png,b,,\n'
                                         'img/2.png,a,\n')
  source = readers.csv_list(cfg(data_path=str(tmp_path / 'trailing.csv'), image_size=4))
  assert source.class_names == ('a', 'b') and source.parts['train'].labels.tolist() == [0, 1, 0]
  (tmp_path / 'list.csv').write_text('path,label\nimg/0.png,a\nimg/1.png,b,extra\n'
                                     'img/2.png,a\n')
  with pytest.raises(DataError, match=r'list.csv: line 3 has more cells than the header'):
    readers.csv_list(cfg(data_path=str(tmp_path / 'list.csv'), image_size=4))
  (tmp_path / 'gt.csv').write_text('image,MEL,NV\n0,1,0\n1,0,1,1\n')
  with pytest.raises(DataError, match=r'gt.csv: line 3 has more cells'):
    readers.isic(cfg(data_path=str(tmp_path / 'img'), labels_csv=str(tmp_path / 'gt.csv'),
                     image_size=4))


def test_csv_of_paths_and_labels(tmp_path):
  for i in range(4):
    write_png(tmp_path / 'img' / f'{i}.png', (i * 50, 0, 0))
  (tmp_path / 'list.csv').write_text('path,label\nimg/0.png,benign\nimg/1.png,malignant\n'
                                     'img/2.png,benign\nimg/3.png,benign\n')
  source = readers.csv_list(cfg(data_path=str(tmp_path / 'list.csv'), image_size=4))
  assert source.class_names == ('benign', 'malignant')
  assert source.parts['train'].labels.tolist() == [0, 1, 0, 0]
  (tmp_path / 'bad.csv').write_text('file,label\nimg/0.png,benign\n')
  with pytest.raises(DataError, match=r"bad.csv: missing column\(s\) \['path'\]"):
    readers.csv_list(cfg(data_path=str(tmp_path / 'bad.csv'), image_size=4))
  (tmp_path / 'dup.csv').write_text('path,label\nimg/0.png,a\nimg/0.png,b\n')
  with pytest.raises(DataError, match='duplicate path'):
    readers.csv_list(cfg(data_path=str(tmp_path / 'dup.csv'), image_size=4))
  (tmp_path / 'latin.csv').write_bytes('path,label\nimg/\xe9.png,a\n'.encode('latin-1'))
  with pytest.raises(DataError, match='not a readable UTF-8 CSV'):
    readers.csv_list(cfg(data_path=str(tmp_path / 'latin.csv'), image_size=4))


def test_isic_ground_truth_csv(tmp_path):
  rows = ['image,MEL,NV,BCC,UNK']
  for i, column in enumerate([1, 1, 0, 2, 1, 0]):
    write_png(tmp_path / 'imgs' / f'ISIC_{i:07d}.png', (i, i, i))
    onehot = ['0.0'] * 3
    onehot[column] = '1.0'
    rows.append(f'ISIC_{i:07d},' + ','.join(onehot) + ',0.0')
  (tmp_path / 'gt.csv').write_text('\n'.join(rows) + '\n')
  source = readers.isic(cfg(data_path=str(tmp_path / 'imgs'), labels_csv=str(tmp_path / 'gt.csv'),
                            image_size=4))
  assert source.class_names == ('MEL', 'NV', 'BCC')
  assert source.parts['train'].labels.tolist() == [1, 1, 0, 2, 1, 0]
  assert any('dropped the empty UNK column' in n for n in source.notes)
  rows[3] = 'ISIC_0000002,1.0,1.0,0.0,0.0'
  (tmp_path / 'gt.csv').write_text('\n'.join(rows) + '\n')
  with pytest.raises(DataError, match='line 4 .ISIC_0000002. must have exactly one class'):
    readers.isic(cfg(data_path=str(tmp_path / 'imgs'), labels_csv=str(tmp_path / 'gt.csv'),
                     image_size=4))


def test_bit_depth_reaches_the_decoder_and_a_prepared_cache_keeps_it(tmp_path):
  values = (np.arange(36, dtype=np.uint16).reshape(6, 6) * 100)  # up to 3500: 12 bits
  for label in ('a', 'b'):
    for i in range(6):
      (tmp_path / 'data' / label).mkdir(parents=True, exist_ok=True)
      Image.fromarray(values + i).save(tmp_path / 'data' / label / f'{i}.png')
  source = readers.folder(cfg(data_path=str(tmp_path / 'data'), image_size=6, bit_depth=12))
  first = source.parts['train'].take(np.arange(1))[0, ..., 0]
  np.testing.assert_array_equal(first, values >> 4)
  prepare.prepare('folder', str(tmp_path / 'data'), str(tmp_path / 'cache'), image_size=6,
                  bit_depth=12)
  cached = readers.prepared(cfg(data_path=str(tmp_path / 'cache'), bit_depth=12))
  np.testing.assert_array_equal(cached.parts['train'].take(np.arange(1))[0, ..., 0], first)
  with pytest.raises(DataError, match=r'config.bit_depth=16, but .*cache was prepared with '
                                      r'--bit_depth=12: set --config.bit_depth=12'):
    readers.prepared(cfg(data_path=str(tmp_path / 'cache'), bit_depth=16))
  with pytest.raises(DataError, match=r'--bit_depth=17: the significant bits'):
    prepare.prepare('folder', str(tmp_path / 'data'), str(tmp_path / 'c2'), image_size=6,
                    bit_depth=17)


def test_skip_corrupt_refuses_a_data_set_of_no_readable_images(tmp_path):
  for i in range(3):
    (tmp_path / 'data' / ('a' if i else 'b')).mkdir(parents=True, exist_ok=True)
    (tmp_path / 'data' / ('a' if i else 'b') / f'{i}.png').write_bytes(b'not a png')
  for reader_call in (
      lambda: readers.folder(cfg(data_path=str(tmp_path / 'data'), image_size=4,
                                 skip_corrupt=True)),
      lambda: prepare.prepare('folder', str(tmp_path / 'data'), str(tmp_path / 'cache'),
                              image_size=4, skip_corrupt=True)):
    with pytest.raises(DataError, match=r'none of the 3 image\(s\) can be read.*data/a/1.png'):
      reader_call()
  assert not (tmp_path / 'cache' / 'meta.json').exists()


def test_a_class_too_small_to_split_is_refused_by_name_before_decoding(tmp_path, monkeypatch):
  from imbal_jax.data import imagefiles
  make_folder_tree(tmp_path / 'data')
  write_png(tmp_path / 'data' / 'rare' / 'r0.png', (9, 9, 9))
  decoded = []
  original = imagefiles.decode_image
  monkeypatch.setattr(imagefiles, 'decode_image', lambda *a: decoded.append(a) or original(*a))
  training = cfg(data_path=str(tmp_path / 'data'), image_size=4, seed=0, split_seed=0,
                 val_fraction=0.1, test_fraction=0.2)
  with pytest.raises(DataError, match=r"class 'rare' has only 1 image\(s\): too few to "
                                      'split off a test split'):
    readers.folder(training)
  assert not decoded
  # prepare does not split (the training run's config does), so it reads the folder, and
  # says what training with the default fractions would say, outside the cache's notes.
  readers.folder(cfg(data_path=str(tmp_path / 'data'), image_size=4))
  assert len(decoded) == 10
  meta = prepare.prepare('folder', str(tmp_path / 'data'), str(tmp_path / 'cache'), image_size=4)
  assert meta['split_warning'].startswith('with the default split fractions (val 0.1, test 0.2), '
                                          "training on this cache would stop: class 'rare'")
  assert not any('split' in note for note in
                 readers.prepared(cfg(data_path=str(tmp_path / 'cache'))).notes)
  # An installed package has no configs/: the fractions are then 0.1 and 0.2 all the same.
  from imbal_jax import configuration
  monkeypatch.setattr(configuration, 'default_config', lambda stage: {})
  meta = prepare.prepare('folder', str(tmp_path / 'data'), str(tmp_path / 'cache2'),
                         image_size=4)
  assert meta['split_warning'].startswith('with the default split fractions (val 0.1, test 0.2)')


def test_prepare_writes_a_cache_that_reads_back_identically(tmp_path):
  make_folder_tree(tmp_path / 'data')
  meta = prepare.prepare('folder', str(tmp_path / 'data'), str(tmp_path / 'cache'), image_size=5)
  assert meta['count'] == 9 and meta['class_counts'] == [3, 3, 3]
  direct = readers.folder(cfg(data_path=str(tmp_path / 'data'), image_size=5))
  cached = readers.prepared(cfg(data_path=str(tmp_path / 'cache')))
  assert cached.class_names == direct.class_names
  assert isinstance(cached.parts['train'].images, np.memmap)
  np.testing.assert_array_equal(cached.parts['train'].take(np.arange(9)),
                                direct.parts['train'].take(np.arange(9)))
  with pytest.raises(DataError, match='already holds a prepared data set'):
    prepare.prepare('folder', str(tmp_path / 'data'), str(tmp_path / 'cache'), image_size=5)
  (tmp_path / 'cache' / 'meta.json').unlink()
  with pytest.raises(DataError, match='no meta.json'):
    readers.prepared(cfg(data_path=str(tmp_path / 'cache')))


@pytest.mark.parametrize('damage,message', [
    (lambda d: (d / 'meta.json').write_text('{"name": "x"'), r'meta.json cannot be read'),
    (lambda d: (d / 'meta.json').write_text('{"name": "x"}'), r'meta.json cannot be read'),
    (lambda d: (d / 'labels.npy').unlink(), r'labels.npy cannot be read'),
    (lambda d: (d / 'images.npy').write_bytes(b'\x93NUMPY broken'), r'images.npy cannot be read'),
    (lambda d: np.save(d / 'parts.npy', np.zeros(4, np.int8)), r'do not describe the same images'),
    (lambda d: np.save(d / 'labels.npy', np.full(9, 3)), r'labels.npy holds values outside 0..2'),
    (lambda d: np.save(d / 'parts.npy', np.full(9, -1)), r'parts.npy holds values outside 0..2'),
    (lambda d: np.save(d / 'parts.npy', np.full(9, 2, np.int8)), r'holds no training images'),
])
def test_a_damaged_prepared_cache_is_refused_by_name(tmp_path, damage, message):
  make_folder_tree(tmp_path / 'data')
  prepare.prepare('folder', str(tmp_path / 'data'), str(tmp_path / 'cache'), image_size=5)
  damage(tmp_path / 'cache')
  with pytest.raises(DataError, match=rf'{tmp_path / "cache"} is damaged or incomplete: '
                     rf'.*{message}.*Run the prepare command again'):
    readers.prepared(cfg(data_path=str(tmp_path / 'cache')))


def test_prepared_cache_trains_through_the_protocol(tmp_path):
  make_folder_tree(tmp_path / 'data')
  prepare.prepare('folder', str(tmp_path / 'data'), str(tmp_path / 'cache'), image_size=5)
  config = cfg(dataset='prepared', data_path=str(tmp_path / 'cache'), imbalance_ratio=None,
               seed=0, split_seed=0, val_fraction=0.2, test_fraction=0.2)
  data = sources.load(config)
  assert sum(len(data.splits[s]) for s in sources.SPLITS) == 9
  assert data.class_counts('val').tolist() == [1, 1, 1]


@functools.cache  # tfds registers a builder class by name, once per process
def _tiny_tfds_builder():
  import io
  import tensorflow_datasets as tfds

  class TinyLtImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(8, 8, 3)),
          'label': tfds.features.ClassLabel(names=['cat', 'dog', 'eel'])}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(60, 0), 'test': self._generate_examples(15, 1)}

    def _generate_examples(self, count, seed):
      rng = np.random.default_rng(seed)
      for i in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, 'PNG')
        yield i, {'image': buffer.getvalue(), 'label': i % 3}

  return TinyLtImages


def write_tiny_tfds(data_dir):
  """A tfds data set 'tiny_lt_images' in array_record format: 60 train and 15 test
  8x8 RGB images of 3 classes (image i has class i % 3), built without TensorFlow."""
  _tiny_tfds_builder()(data_dir=str(data_dir), file_format='array_record').download_and_prepare()


def test_tfds_array_record_source_without_tensorflow(tmp_path):
  write_tiny_tfds(tmp_path)
  source = readers.tfds_source(cfg(tfds_name='tiny_lt_images', data_dir=str(tmp_path)))
  assert source.class_names == ('cat', 'dog', 'eel') and source.balanced
  assert len(source.parts['train']) == 60 and len(source.parts['test']) == 15
  # tfds stores records in its own (hashed) order: compare image -> label pairs.
  rng = np.random.default_rng(1)
  expected = {rng.integers(0, 256, (8, 8, 3), dtype=np.uint8).tobytes(): i % 3 for i in range(15)}
  test = source.parts['test']
  read = {test.take([i])[0].tobytes(): int(test.labels[i]) for i in range(15)}
  assert read == expected
  # Balanced (20 per class): classes rank by index for the long-tail profile. A naturally
  # imbalanced set ranks them by count.
  assert readers.equal_class_counts(np.arange(30) % 3, 3)
  assert not readers.equal_class_counts(np.array([0, 0, 1, 2]), 3)
  assert not readers.equal_class_counts(np.array([0, 1]), 3)  # a class with none
  with pytest.raises(DataError, match="tfds data set 'no_such_set' .* cannot be read"):
    readers.tfds_source(cfg(tfds_name='no_such_set', data_dir=str(tmp_path)))


def test_missing_files_are_named_before_any_image_is_decoded(tmp_path, monkeypatch):
  from imbal_jax.data import imagefiles
  (tmp_path / 'img').mkdir()
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / 'img' / 'a.png')
  (tmp_path / 'img' / 'broken.png').write_bytes(b'not an image')
  rows = ['path,label', 'img/a.png,x', 'img/gone.png,y', 'img/broken.png,x', 'img/b.png,y']
  (tmp_path / 'list.csv').write_text('\n'.join(rows) + '\n')
  decoded = []
  real = imagefiles.decode_image
  monkeypatch.setattr(imagefiles, 'decode_image', lambda path, *args: decoded.append(path) or
                      real(path, *args))
  config = cfg(data_path=str(tmp_path / 'list.csv'), image_size=4)
  with pytest.raises(DataError, match=r'(?s)^2 image\(s\) cannot be read:\n  .*img/gone.png: cannot '
                     r'decode image \(no such file\).\n  .*img/b.png: .*skip_corrupt=True'):
    readers.READERS['csv'](config)
  assert decoded == []  # refused before decoding anything
  # With the missing files fixed, the corrupt one is named after decoding.
  for name in ('gone', 'b'):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / 'img' / f'{name}.png')
  with pytest.raises(DataError, match=r'^1 image\(s\) cannot be read:\n  .*broken.png'):
    readers.READERS['csv'](config)
  # skip_corrupt leaves out missing and corrupt files alike, and counts them.
  (tmp_path / 'img' / 'gone.png').unlink()
  source = readers.READERS['csv'](cfg(data_path=str(tmp_path / 'list.csv'), image_size=4,
                                      skip_corrupt=True))
  assert len(source.parts['train']) == 2 and len(source.notes) == 2


def test_prepare_refuses_an_unwritable_output_before_decoding(tmp_path, monkeypatch):
  from imbal_jax.data import imagefiles
  make_folder_tree(tmp_path / 'data')
  monkeypatch.setattr(imagefiles, 'decode_image', lambda *a: pytest.fail('decoded first'))
  (tmp_path / 'a_file').write_text('')
  with pytest.raises(DataError, match=r'--output=.*a_file/cache cannot be written .*choose a '
                     r'folder you can write to'):
    prepare.prepare('folder', str(tmp_path / 'data'), str(tmp_path / 'a_file' / 'cache'),
                    image_size=5)
