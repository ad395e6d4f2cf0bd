"""Fuzzing the image readers (class folders, path,label CSV, ISIC ground truth).

Every input is read exactly, or refused with one DataError naming the file. Hypothesis writes
small trees of good, random, empty, truncated and bomb-sized image files (some with non-UTF-8
names) and small, often malformed, CSVs, and checks each reader against an independent model:
a read must give exactly the labels, pixels and class names written; a refusal must be a
single DataError whose message names the offending file(s); anything else fails. The
regression tests at the end pin one minimal case of each reader bug the fuzzing found.
"""

import csv
import io
import itertools
import os
import pathlib
import re
import resource
import tempfile

import numpy as np
import pytest
from PIL import Image

pytest.importorskip('hypothesis')
from hypothesis import example, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fuzz_helpers import (FUZZ, IMAGE_SIZE, PALETTE, attempt, bomb_png,  # noqa: E402
                          cfg, check_images_read, class_order, encode_image, reference_colour,
                          refuses, shown, write, write_csv_images, write_tree)
from imbal_jax.data import imagefiles, readers  # noqa: E402
from imbal_jax.data.sources import DataError  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Image folders: good, random, empty, truncated and bomb-sized files; non-UTF-8 names.

FILE_KINDS = ('png', 'png', 'png', 'jpg', 'jpg', 'random', 'empty', 'cut_png', 'cut_jpg', 'bomb',
              'text')
BOMB_SIZES = ((20000, 20000), (1, 200_000_000), (2**31 - 1, 2**31 - 1), (9500, 9500), (0, 7),
              (2**32 - 1, 1))


@st.composite
def image_file(draw, number, clean):
  """(file name as bytes, content) for a file of a random kind; its colour is PALETTE[number]."""
  kind = draw(st.sampled_from(('png', 'jpg', 'text') if clean else FILE_KINDS))
  colour = PALETTE[number % len(PALETTE)]
  size = (draw(st.integers(1, 6)), draw(st.integers(1, 6)))
  if kind in ('png', 'cut_png'):
    data = encode_image(colour, size, draw(st.sampled_from(['RGB', 'L', 'RGBA', 'P'])), 'PNG')
    suffix = draw(st.sampled_from(['.png', '.PNG', '.jpg']))  # content decides, not the name
  elif kind in ('jpg', 'cut_jpg'):
    data = encode_image(colour, size, draw(st.sampled_from(['RGB', 'L'])), 'JPEG')
    suffix = draw(st.sampled_from(['.jpg', '.jpeg', '.JPG']))
  elif kind == 'bomb':
    data, suffix = bomb_png(*draw(st.sampled_from(BOMB_SIZES))), '.png'
  else:
    data = {'random': draw(st.binary(min_size=1, max_size=64)), 'empty': b'',
            'text': b'not an image'}[kind]
    suffix = '.txt' if kind == 'text' else draw(st.sampled_from(['.png', '.jpg', '.tif',
                                                                 '.webp', '.bmp']))
  if kind.startswith('cut_'):
    data = data[:draw(st.integers(1, len(data) - 1))]
  stem = str(number).encode()
  if draw(st.integers(0, 4)) == 0:
    stem = b'\xff' + stem  # not UTF-8: Linux allows any bytes but '/' and NUL
  return stem + suffix.encode(), data


CLASS_NAMES = (b'benign', b'malignant', b'nevus', b'cl\xffass', b'\xe9t\xe9')


@st.composite
def image_tree(draw):
  """{(class folder bytes or None for the root, file name bytes): content}."""
  classes = draw(st.lists(st.sampled_from(CLASS_NAMES), min_size=1, max_size=3, unique=True))
  clean = draw(st.integers(0, 2)) == 0  # only decodable images (and ignored text files)
  numbers = itertools.count()
  tree = {}
  for name in classes:
    for _ in range(draw(st.integers(1, 3))):
      file_name, data = draw(image_file(next(numbers), clean))
      tree[(name, file_name)] = data
  if draw(st.integers(0, 14)) == 0:
    tree[(None, b'stray.png')] = encode_image((1, 2, 3), (3, 3), 'RGB', 'PNG')
  return tree


MIXED_TREE = {  # one of each problem, always tried first
    (b'benign', b'0.png'): encode_image(PALETTE[0], (5, 3), 'RGB', 'PNG'),
    (b'benign', b'\xff1.jpg'): encode_image(PALETTE[1], (4, 4), 'RGB', 'JPEG'),
    (b'cl\xffass', b'2.png'): bomb_png(20000, 20000),
    (b'cl\xffass', b'3.png'): b'',
    (b'cl\xffass', b'4.PNG'): encode_image(PALETTE[4], (6, 6), 'RGB', 'PNG')[:40],
    (b'nevus', b'5.jpeg'): encode_image(PALETTE[5], (6, 6), 'RGB', 'JPEG')[:200],
    (b'nevus', b'6.txt'): b'ignored',
}


@pytest.mark.filterwarnings('ignore::PIL.Image.DecompressionBombWarning')
@FUZZ
@given(tree=image_tree(), skip=st.booleans())
@example(tree=MIXED_TREE, skip=True)
@example(tree=MIXED_TREE, skip=False)
def test_folder_fuzz(tree, skip):
  with tempfile.TemporaryDirectory() as tmp:
    root = os.path.join(os.fsencode(tmp), b'data')
    os.makedirs(root)
    written = write_tree(root, tree)
    got, message = attempt('folder', cfg(data_path=os.fsdecode(root), skip_corrupt=skip))
    offered = {(f, n): d for (f, n), d in tree.items()
               if os.path.splitext(n)[1].decode().lower() in imagefiles.IMAGE_SUFFIXES}
    classes = sorted({os.fsdecode(f) for f, _ in offered if f is not None})
    # A folder of text files only would be a class lost without a word: refused.
    if {f for f, _ in tree if f is not None} - {f for f, _ in offered}:
      assert message is not None and 'but no image with a suffix' in message, message
      return
    if any(f is None for f, _ in offered) or not classes:
      assert message is not None and message.startswith(f'{os.fsdecode(root)}: '), message
      return
    good, bad = [], []
    for (folder, name), data in offered.items():
      colour = reference_colour(data)
      path = os.fsdecode(os.path.join(root, folder, name))
      if colour is None:
        bad.append(path)
      else:
        good.append((classes.index(os.fsdecode(folder)), colour))
    assert set(written) >= set(bad)
    check_images_read(got, good, bad, skip, message)
    if message is None:
      assert shown(got.class_names) == shown(classes)


# PIL warns between 1x and 2x its pixel limit (9500x9500 here) and raises above; both are fine.
@pytest.mark.filterwarnings('ignore::PIL.Image.DecompressionBombWarning')
def test_bomb_sized_png_headers_are_refused_by_name_without_allocating():
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
  with tempfile.TemporaryDirectory() as tmp:
    for width, height in BOMB_SIZES + ((50_000, 50_000), (65_535, 65_535)):
      path = pathlib.Path(tmp) / f'bomb_{width}x{height}.png'
      path.write_bytes(bomb_png(width, height))
      with pytest.raises(DataError, match=re.escape(str(path))):
        imagefiles.decode_image(path, IMAGE_SIZE)
  grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
  assert grown_mib < 256, f'decoding bomb headers raised peak memory by {grown_mib:.0f} MiB'


def test_non_utf8_file_and_class_names_are_read_or_named():
  with tempfile.TemporaryDirectory() as tmp:
    root = os.path.join(os.fsencode(tmp), b'data')
    tree = {(b'cl\xffass', b'\xfe0.png'): encode_image(PALETTE[0], (5, 5), 'RGB', 'PNG'),
            (b'ok', b'1.png'): encode_image(PALETTE[1], (5, 5), 'RGB', 'PNG'),
            (b'ok', b'\xfd2.jpg'): b'junk'}
    write_tree(root, tree)
    bad = os.fsdecode(os.path.join(root, b'ok', b'\xfd2.jpg'))
    with pytest.raises(DataError) as error:
      readers.folder(cfg(data_path=os.fsdecode(root)))
    assert bad in str(error.value)
    source = readers.folder(cfg(data_path=os.fsdecode(root), skip_corrupt=True))
    assert shown(source.class_names) == ('cl\\xffass', 'ok')
    assert source.parts['train'].labels.tolist() == [0, 1]
    assert len(source.notes) == 1 and bad in source.notes[0]


# ---------------------------------------------------------------------------------------------
# path,label CSVs: headers, short rows, empty and odd labels, duplicates, encodings, missing files.

CSV_PATHS = ('img/0.png', 'img/1.png', 'img/2.png', 'img/bad.png', 'img/missing.png',
             './img/0.png', 'img//1.png')
CSV_LABELS = ('0', '1', '2', '10', '01', 'benign', 'malignant', 'Benign', ' benign ', 'é', '',
              '  ', 'a,b', 'say "hi"', 'x\ny', '²')
CSV_HEADERS = (('path', 'label'),) * 5 + (('label', 'path'), ('path', 'label', 'note'),
                                          ('path',), ('file', 'label'), ('Path', 'label'),
                                          ('path', 'label', 'label'))


@st.composite
def csv_case(draw):
  clean = draw(st.booleans())  # a well-formed CSV (its images may still be missing or corrupt)
  header = draw(st.sampled_from(CSV_HEADERS[4:7] if clean else CSV_HEADERS))
  paths = draw(st.lists(st.sampled_from(CSV_PATHS[:5] if clean else CSV_PATHS),
                        min_size=int(clean), max_size=5, unique=clean))
  labels = CSV_LABELS
  if clean:  # numeric labels half the time: their order ('2' before '10') is part of the contract
    labels = draw(st.sampled_from([('0', '1', '2', '10', '01', '9'),
                                   tuple(l for l in CSV_LABELS if l.strip() and l != '²')]))
  rows = []
  for path in paths:
    row = {'path': path, 'label': draw(st.sampled_from(labels)), 'file': 'x', 'note': 'n',
           'Path': 'y'}
    short = not clean and draw(st.integers(0, 9)) == 0
    rows.append(([row['path']] if short else [row[c] for c in header], short, row))
  return (header, rows, draw(st.sampled_from(['\n', '\r\n'])),
          draw(st.sampled_from(['utf-8'] * 4 + ['latin-1'])), draw(st.booleans()))


def csv_example(*pairs, skip=False, header=('path', 'label')):
  """A csv_case value for @example: rows of (path, label), one cell per header column."""
  rows = [([{'path': path}.get(c, label) for c in header], False,
           {'path': path, 'label': label}) for path, label in pairs]
  return header, rows, '\n', 'utf-8', skip


@FUZZ
@given(case=csv_case())
@example(case=csv_example(('img/0.png', '10'), ('img/1.png', '2'), ('img/2.png', 'b')))
@example(case=csv_example(('img/bad.png', 'a'), ('img/1.png', 'b'), ('img/missing.png', 'a'),
                          skip=True))
@example(case=csv_example(('img/0.png', 'a'), ('./img/0.png', 'b')))  # one image, two spellings
@example(case=csv_example(('img/0.png', 'a'), header=('path', 'label', 'label')))
def test_csv_list_fuzz(case):
  header, rows, newline, encoding, skip = case
  with tempfile.TemporaryDirectory() as tmp:
    directory = pathlib.Path(tmp)
    colours = write_csv_images(directory)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator=newline)
    writer.writerow(header)
    writer.writerows(cells for cells, _, _ in rows)
    text = buffer.getvalue()
    csv_path = directory / 'list.csv'
    csv_path.write_bytes(text.encode(encoding))
    got, message = attempt('csv', cfg(data_path=str(csv_path), skip_corrupt=skip))
    labels = [row['label'].strip() for _, _, row in rows]
    # './img/0.png' and 'img//1.png' are 'img/0.png' and 'img/1.png' under other spellings.
    paths = [row['path'] for _, _, row in rows]
    if ((encoding == 'latin-1' and not text.isascii()) or 'path' not in header
        or 'label' not in header or len(set(header)) < len(header) or not rows
        or any(short for _, short, _ in rows) or '' in labels
        or len({os.path.normpath(p) for p in paths}) < len(paths)):
      assert message is not None and str(csv_path) in message, message
      return
    names = sorted(set(labels), key=class_order)
    good, bad = [], []
    for path, label in zip(paths, labels):
      normal = os.path.normpath(path)
      if normal in colours:
        good.append((names.index(label), colours[normal]))
      else:
        bad.append(str(directory / path))
    check_images_read(got, good, bad, skip, message)
    if message is None:
      assert got.class_names == tuple(names)
      kept = [names.index(l) for p, l in zip(paths, labels) if os.path.normpath(p) in colours]
      assert got.parts['train'].labels.tolist() == kept  # in file order


@FUZZ
@given(text=st.text(alphabet=st.sampled_from('path,label\n\r"  ab01²é/.img\x00\t;'), max_size=60)
       | st.binary(max_size=60), headed=st.booleans(), skip=st.booleans())
def test_csv_list_random_text_fuzz(text, headed, skip):
  with tempfile.TemporaryDirectory() as tmp:
    directory = pathlib.Path(tmp)
    write_csv_images(directory)
    data = text if isinstance(text, bytes) else text.encode('utf-8')
    csv_path = directory / 'list.csv'
    csv_path.write_bytes((b'path,label\n' if headed else b'') + data)
    got, message = attempt('csv', cfg(data_path=str(csv_path), skip_corrupt=skip))
    if message is not None and str(csv_path) in message:
      return
    # Otherwise the CSV parsed, and a refusal must name images it lists (paths may be absolute).
    with csv_path.open(newline='', encoding='utf-8-sig') as handle:
      rows = list(csv.DictReader(handle))
    listed = {str(directory / r['path']) for r in rows}
    if message is not None and message.startswith('none of the'):  # skip_corrupt, none read
      first = re.search(r'the first: (.*): cannot decode image', message).group(1)
      assert skip and message.startswith(f'none of the {len(rows)} image(s)'), message
      assert first in listed, (first, listed)
      return
    if message is not None:
      named = re.findall(r'^  (.*): cannot decode image', message, re.MULTILINE)
      assert message.startswith(f'{len(named)} image(s) cannot be read'), message
      assert named and set(named) <= listed, (named, listed)
      return
    skipped = [n for n in got.notes if n.startswith('skipped corrupt image: ')]
    assert len(got.parts['train']) + len(skipped) == len(rows)
    assert got.class_names == tuple(sorted({r['label'].strip() for r in rows}, key=class_order))


# ---------------------------------------------------------------------------------------------
# ISIC ground truth: one-hot matrices with bad rows, odd cells, an empty UNK column, duplicates.

ISIC_COLUMNS = ('MEL', 'NV', 'BCC', 'UNK')
ISIC_CELLS = ('0', '1', '0.0', '1.0', '', 'x', 'nan', '2', '-1', ' 1 ', '1e0', '0.5')


@st.composite
def isic_case(draw):
  clean = draw(st.booleans())  # well-formed ground truth (its images may still be bad)
  columns = draw(st.lists(st.sampled_from(ISIC_COLUMNS), min_size=1, max_size=4, unique=True))
  if not clean and draw(st.integers(0, 9)) == 0:
    columns.append(draw(st.sampled_from(columns)))  # a duplicated header name
  id_column = 'image' if clean or draw(st.integers(0, 14)) else 'id'
  unk = 'zeros' if clean else draw(st.sampled_from(['zeros', 'blank', 'free']))
  rows = []
  numbers = draw(st.lists(st.integers(0, 5), min_size=1, max_size=5, unique=clean))
  for number in numbers:
    image_id = f'ISIC_{number:07d}'
    if clean or draw(st.integers(0, 3)):
      hot = draw(st.sampled_from([c for c in columns if c != 'UNK'] or columns))
      cells = ['1.0' if c == hot else '0.0' for c in columns]
    else:
      cells = [draw(st.sampled_from(ISIC_CELLS)) for _ in columns]
    if unk != 'free':
      cells = [{'zeros': '0.0', 'blank': ''}[unk] if c == 'UNK' else v
               for c, v in zip(columns, cells)]
    rows.append([image_id] + cells)
  files = {}
  for image_id in sorted({row[0] for row in rows}):
    files[image_id] = draw(st.sampled_from(['.jpg', '.png', '.jpeg', 'missing', 'corrupt']))
  return [id_column] + columns, rows, files, draw(st.booleans())


def isic_model(header, rows):
  """(labels, class names, unk dropped) or None if the CSV itself must be refused."""
  if 'image' not in header or len(set(header)) < len(header):
    return None
  columns = header[1:]
  try:
    onehot = np.asarray([[float(v) for v in row[1:]] for row in rows]).reshape(len(rows), -1)
  except ValueError:
    return None
  # Only an all-zero UNK column is dropped (one of 1 and -1 only sums to 0: its rows are bad).
  dropped = 'UNK' in columns and (onehot[:, columns.index('UNK')] == 0).all()
  if dropped:
    keep = [i for i, c in enumerate(columns) if c != 'UNK']
    columns, onehot = [columns[i] for i in keep], onehot[:, keep]
  if not all(sorted(r) == [0.0] * (len(columns) - 1) + [1.0] for r in onehot.tolist()):
    return None
  if len({row[0] for row in rows}) < len(rows):
    return None
  return onehot.argmax(axis=1).tolist(), columns, dropped


def isic_example(header, *cells):
  """An isic_case value for @example: ISIC_0000000, ISIC_0000001, ... with these cells."""
  rows = [[f'ISIC_{i:07d}', *row.split(',')] for i, row in enumerate(cells)]
  return header, rows, {row[0]: '.jpg' for row in rows}, False


@FUZZ
@given(case=isic_case())
@example(case=isic_example(['image', 'MEL', 'NV', 'MEL'], '1.0,0.0,1.0', '0.0,1.0,0.0'))
@example(case=isic_example(['image', 'MEL', 'NV', 'UNK'], '1.0,0.0,1.0', '0.0,1.0,-1.0'))
@example(case=isic_example(['image', 'MEL', 'NV', 'UNK'], '1.0,0.0,0.0', '0.0,1.0,0.0'))
def test_isic_fuzz(case):
  header, rows, files, skip = case
  with tempfile.TemporaryDirectory() as tmp:
    image_dir = pathlib.Path(tmp) / 'images'
    image_dir.mkdir()
    colours = {}
    for number, (image_id, how) in enumerate(files.items()):
      if how == 'corrupt':
        (image_dir / f'{image_id}.jpg').write_bytes(b'\xff\xd8\xff broken')
      elif how != 'missing':
        fmt = 'PNG' if how == '.png' else 'JPEG'
        data = encode_image(PALETTE[number], (6, 5), 'RGB', fmt)
        (image_dir / f'{image_id}{how}').write_bytes(data)
        colours[image_id] = reference_colour(data)
    csv_path = pathlib.Path(tmp) / 'ground_truth.csv'
    csv_path.write_text(','.join(header) + '\n' + ''.join(','.join(r) + '\n' for r in rows))
    got, message = attempt('isic', cfg(data_path=str(image_dir), labels_csv=str(csv_path),
                                       skip_corrupt=skip))
    want = isic_model(header, rows)
    if want is None:
      assert message is not None and str(csv_path) in message, message
      return
    labels, columns, dropped = want
    good, bad = [], []
    for (image_id, *_), label in zip(rows, labels):
      if image_id in colours:
        good.append((label, colours[image_id]))
      else:
        bad.append(str(image_dir / f'{image_id}.jpg'))  # the name it looked for first
    check_images_read(got, good, bad, skip, message)
    if message is None:
      assert got.class_names == tuple(columns)
      assert got.parts['train'].labels.tolist() == [l for (i, *_), l in zip(rows, labels)
                                                    if i in colours]
      assert any('dropped the empty UNK column' in n for n in got.notes) == dropped


# ---------------------------------------------------------------------------------------------
# Regression tests: one minimal case of each image-reader bug the fuzzing found.

# Guards against: 16-bit grey images (PIL mode I;16) being clipped to 255, i.e. silently white.
def test_sixteen_bit_png_keeps_its_top_eight_bits(tmp_path):
  values = np.arange(16, dtype=np.uint16).reshape(4, 4) * 4096 + 100
  path = tmp_path / 'xray.png'
  Image.fromarray(values).save(path)
  pixels = imagefiles.decode_image(path, 4)
  for channel in range(3):
    np.testing.assert_array_equal(pixels[..., channel], values >> 8)


# Guards against: 12-bit values in a 16-bit file (common for X-ray exports) keeping only the
# top 8 of 16 bits, 16 grey levels, with no way to say otherwise: config.bit_depth says.
@pytest.mark.parametrize('depth', [10, 12, 14])
def test_sixteen_bit_png_keeps_the_top_eight_of_its_bit_depth(tmp_path, depth):
  values = (np.arange(16, dtype=np.uint16).reshape(4, 4) * ((1 << depth) // 16) + 3)
  path = tmp_path / 'xray.png'
  Image.fromarray(values).save(path)
  pixels = imagefiles.decode_image(path, 4, bit_depth=depth)
  expected = values >> (depth - 8)
  assert expected.max() > 200  # the image's range, not 16 levels
  for channel in range(3):
    np.testing.assert_array_equal(pixels[..., channel], expected)
  # One depth for a data set: a value is the same brightness in every image, whatever
  # the brightest pixel of each (a darker image is not stretched).
  dark = tmp_path / 'dark.png'
  Image.fromarray(values // 4).save(dark)
  np.testing.assert_array_equal(imagefiles.decode_image(dark, 4, bit_depth=depth)[..., 0],
                                (values // 4) >> (depth - 8))


def test_to_8_bits_matches_a_slow_reference():
  rng = np.random.default_rng(0)
  for depth in range(8, 17):
    pixels = rng.integers(0, 1 << 16, size=(5, 5)).astype(np.uint16)
    expected = np.array([[min(255, v // 2 ** (depth - 8)) for v in row]
                         for row in pixels.tolist()])
    np.testing.assert_array_equal(imagefiles.to_8_bits(pixels, depth), expected)


# Guards against: images between 1x and 2x Image.MAX_IMAGE_PIXELS decoding in full (PIL only
# warns there: a 641 KB PNG claiming 13000x13000 RGBA took 1.3 GB and 6 s per decode thread).
@pytest.mark.filterwarnings('ignore::PIL.Image.DecompressionBombWarning')
def test_images_over_the_pixel_limit_are_refused(tmp_path, monkeypatch):
  # The same case scaled down: a 10,000-pixel limit and a 110x110 (1.2x) image.
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 10_000)
  path = write(tmp_path / 'big.png', encode_image((5, 5, 5), (110, 110), 'RGB', 'PNG'))
  refuses(lambda: imagefiles.decode_image(path, IMAGE_SIZE), path)


# Guards against: a non-UTF-8 class folder name giving a class name with lone surrogates, which
# reports (written as UTF-8) cannot write.
def test_non_utf8_class_folder_names_are_writable_text(tmp_path):
  root = os.path.join(os.fsencode(str(tmp_path)), b'data')
  write_tree(root, {(b'caf\xe9', b'0.png'): encode_image(PALETTE[0], (3, 3), 'RGB', 'PNG')})
  source = readers.folder(cfg(data_path=os.fsdecode(root)))
  assert source.class_names == ('caf\\xe9',)
  for name in source.class_names:
    name.encode('utf-8')


# Guards against: a CSV row missing a cell crashing on None.strip() or path / None.
@pytest.mark.parametrize('text', [b'path,label\nimg/0.png,a\nimg/1.png\n',
                                  b'label,path\na,img/0.png\nb\n'])
def test_csv_short_row_is_refused(tmp_path, text):
  write_csv_images(tmp_path)
  path = write(tmp_path / 'list.csv', text)
  refuses(lambda: readers.csv_list(cfg(data_path=str(path))), path)


# Guards against: a label such as '²' passing str.isdigit() and then failing int().
def test_csv_superscript_digit_label_is_a_name(tmp_path):
  write_csv_images(tmp_path)
  path = write(tmp_path / 'list.csv', 'path,label\nimg/0.png,²\nimg/1.png,1\n'.encode())
  assert readers.csv_list(cfg(data_path=str(path))).class_names == ('1', '²')


# Guards against: a UTF-8 byte-order mark (Excel) making the first column '\ufeffpath'.
def test_csv_with_byte_order_mark_is_read(tmp_path):
  write_csv_images(tmp_path)
  path = write(tmp_path / 'list.csv', '\ufeffpath,label\nimg/0.png,a\n'.encode())
  assert readers.csv_list(cfg(data_path=str(path))).parts['train'].labels.tolist() == [0]


# Guards against: 'img/0.png' and './img/0.png', one image listed twice, being accepted.
def test_csv_aliased_duplicate_paths_are_refused(tmp_path):
  write_csv_images(tmp_path)
  path = write(tmp_path / 'list.csv', b'path,label\nimg/0.png,a\n./img/0.png,b\n')
  with pytest.raises(DataError, match=re.escape(str(path)) + '.*duplicate path'):
    readers.csv_list(cfg(data_path=str(path)))


# Guards against: config.data_path naming a folder escaping the CSV reader as IsADirectoryError.
def test_csv_path_that_is_a_folder_is_refused(tmp_path):
  refuses(lambda: readers.csv_list(cfg(data_path=str(tmp_path))), tmp_path)


# Guards against: a repeated header name silently keeping only its last column.
@pytest.mark.parametrize('reader', ['csv', 'isic'])
def test_duplicate_header_names_are_refused(tmp_path, reader):
  write_csv_images(tmp_path)
  if reader == 'csv':
    path = write(tmp_path / 'list.csv', b'path,label,label\nimg/0.png,a,b\n')
    config = cfg(data_path=str(path))
  else:
    path = write(tmp_path / 'gt.csv', b'image,MEL,NV,MEL\n0,1.0,0.0,1.0\n1,0.0,1.0,0.0\n')
    config = cfg(data_path=str(tmp_path / 'img'), labels_csv=str(path))
  with pytest.raises(DataError, match=re.escape(str(path)) + '.*duplicate'):
    readers.READERS[reader](config)


# Guards against: an UNK column of 1 and -1 summing to 0, being dropped as empty, and hiding
# two bad rows.
def test_isic_unk_column_that_only_sums_to_zero_is_checked(tmp_path):
  write_csv_images(tmp_path)
  path = write(tmp_path / 'gt.csv', b'image,MEL,NV,UNK\n0,1.0,0.0,1.0\n1,0.0,1.0,-1.0\n')
  with pytest.raises(DataError, match=re.escape(str(path)) + ': line 2'):
    readers.isic(cfg(data_path=str(tmp_path / 'img'), labels_csv=str(path)))


# Guards against: an empty label reported on row + 2 rather than its line (blank lines and
# multi-line cells shift it).
def test_csv_empty_label_reports_its_line(tmp_path):
  write_csv_images(tmp_path)
  path = write(tmp_path / 'list.csv', b'path,label\n\nimg/1.png,"two\nlines"\nimg/0.png,\n')
  with pytest.raises(DataError, match=re.escape(str(path)) + ': empty label on line 5'):
    readers.csv_list(cfg(data_path=str(path)))


# Guards against: an empty path cell being decoded as the CSV's folder, the error naming neither
# the CSV nor the line.
def test_csv_empty_path_is_refused_with_its_line(tmp_path):
  write_csv_images(tmp_path)
  path = write(tmp_path / 'list.csv', b'path,label\nimg/0.png,a\n,b\n')
  with pytest.raises(DataError, match=re.escape(str(path)) + '.*line 3'):
    readers.csv_list(cfg(data_path=str(path)))


# Guards against: predict's folder input not following symlinked sub-folders, its images
# vanishing from the predictions without a note (the training reader follows them).
def test_predict_folder_input_follows_symlinked_folders(tmp_path):
  from imbal_jax.data import inference_inputs
  write_tree(os.fsencode(str(tmp_path / 'data')), {
      (b'a', b'0.png'): encode_image(PALETTE[0], (3, 3), 'RGB', 'PNG')})
  write_tree(os.fsencode(str(tmp_path / 'elsewhere')), {
      (b'b', b'1.png'): encode_image(PALETTE[1], (3, 3), 'RGB', 'PNG'),
      (b'b', b'2.png'): encode_image(PALETTE[2], (3, 3), 'RGB', 'PNG')})
  os.symlink(tmp_path / 'elsewhere' / 'b', tmp_path / 'data' / 'b')
  os.symlink(tmp_path / 'data', tmp_path / 'data' / 'b' / 'loop')  # followed once
  (tmp_path / 'data' / 'a' / '._0.png').write_bytes(b'\x00\x05\x16\x07')  # macOS copy
  inputs = inference_inputs._folder_inputs(tmp_path / 'data', (3, 3, 3))
  assert [os.path.relpath(n, tmp_path / 'data') for n in inputs.names] == [
      'a/0.png', 'b/1.png', 'b/2.png']
  assert inputs.notes == ('left out 1 hidden file(s) (a name starting with "." or a __MACOSX '
                          'folder on the path), e.g. a/._0.png',)


# Guards against: a symlinked class folder not being descended into (Path.rglob before Python
# 3.13), its class and images vanishing silently.
def test_symlinked_class_folder_is_read(tmp_path):
  write_tree(os.fsencode(str(tmp_path / 'data')), {
      (b'a', b'0.png'): encode_image(PALETTE[0], (3, 3), 'RGB', 'PNG')})
  write_tree(os.fsencode(str(tmp_path / 'elsewhere')), {
      (b'b', b'1.png'): encode_image(PALETTE[1], (3, 3), 'RGB', 'PNG')})
  os.symlink(tmp_path / 'elsewhere' / 'b', tmp_path / 'data' / 'b')
  source = readers.folder(cfg(data_path=str(tmp_path / 'data')))
  assert source.class_names == ('a', 'b')
  assert source.parts['train'].labels.tolist() == [0, 1]
