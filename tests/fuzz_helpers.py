"""Shared strategies and checks for the reader fuzz tests (test_fuzz_arrays, test_fuzz_images).

The contract every reader is held to: an input is read exactly (the labels, pixels and class
names written), or refused with one DataError whose message names the offending file. Any
other exception escapes `attempt` and fails the test.
"""

import collections
import io
import itertools
import os
import re
import struct
import zlib

import ml_collections
import numpy as np
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from PIL import Image

from imbal_jax.data import readers
from imbal_jax.data.sources import DataError

# Reproducible in CI (derandomize), no example database written into the repository.
# IMBAL_FUZZ_EXAMPLES=2000 runs a deeper, randomised search locally.
_DEEP = int(os.environ.get('IMBAL_FUZZ_EXAMPLES', 0))
FUZZ = settings(max_examples=_DEEP or 40, deadline=None, derandomize=not _DEEP, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PARTS = ('train', 'val', 'test')
IMAGE_SIZE = 4
# Well-separated colours: each image file gets its own, so an output image names its file.
PALETTE = list(itertools.product((30, 130, 230), repeat=3))


def attempt(reader, config):
  """(source, None) for a read, (None, message) for a DataError; anything else escapes."""
  try:
    source = readers.READERS[reader](config)
  except DataError as error:
    event('outcome: DataError')
    return None, str(error)
  event('outcome: read')
  return source, None


def cfg(**fields):
  base = dict(data_path='', labels_csv='', image_size=IMAGE_SIZE, skip_corrupt=False,
              tfds_name='', data_dir='')
  base.update(fields)
  return ml_collections.ConfigDict(base)


def refuses(read, path):
  """`read()` raises one DataError whose message names `path`."""
  with pytest.raises(DataError, match=re.escape(str(path))):
    read()


def write(path, data):
  path.write_bytes(data)
  return path


def shown(names):
  """Class names as the readers show them: non-UTF-8 bytes escaped (b'\xff' -> '\\xff')."""
  return tuple(n.encode('utf-8', 'surrogateescape').decode('utf-8', 'backslashreplace')
               for n in names)


def all_pixels(source, part='train'):
  split = source.parts[part]
  return split.take(np.arange(len(split)))


@st.composite
def mutated_bytes(draw, original):
  how = draw(st.sampled_from(['cut', 'flip', 'flip', 'insert', 'append', 'random', 'empty']))
  spot = draw(st.integers(0, len(original) - 1))
  if how == 'cut':
    return original[:spot]
  if how == 'flip':
    return original[:spot] + bytes([original[spot] ^ draw(st.integers(1, 255))]) + original[
        spot + 1:]
  junk = draw(st.binary(min_size=1, max_size=40))
  if how == 'insert':
    return original[:spot] + junk + original[spot:]
  if how == 'append':
    return original + junk
  return b'' if how == 'empty' else junk


# ---------------------------------------------------------------------------------------------
# Image files.

def encode_image(colour, size, mode, fmt):
  buffer = io.BytesIO()
  image = Image.new('RGB', size, colour)
  # An adaptive palette keeps a solid image solid (the default web palette dithers).
  palette = {'palette': Image.Palette.ADAPTIVE} if mode == 'P' else {}
  image.convert(mode, **palette).save(buffer, fmt)
  return buffer.getvalue()


def png_chunk(kind, data):
  return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))


def bomb_png(width, height):
  """A PNG whose IHDR claims width x height RGB pixels, with a token IDAT."""
  return (b'\x89PNG\r\n\x1a\n' + png_chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 2,
                                                                  0, 0, 0))
          + png_chunk(b'IDAT', zlib.compress(b'\0' * 64)) + png_chunk(b'IEND', b''))


def reference_colour(data):
  """The colour a small solid image file decodes to, or None if it does not decode."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      if image.width * image.height > 10_000:
        return None
      pixels = np.asarray(image.convert('RGB'))
  except Exception:  # noqa: BLE001 -- not decodable
    return None
  assert (pixels == pixels[0, 0]).all(), 'reference image is not solid'
  return tuple(int(v) for v in pixels[0, 0])


def write_tree(root, tree):
  """Writes {(class folder bytes or None, file name bytes): content} under root (bytes).

  Returns {full path as str: content}.
  """
  written = {}
  for (folder, name), data in tree.items():
    directory = root if folder is None else os.path.join(root, folder)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    with open(path, 'wb') as handle:
      handle.write(data)
    written[os.fsdecode(path)] = data
  return written


def check_images_read(got, good, bad, skip, message):
  """`good`: [(label, colour)] expected read; `bad`: paths that must be named or skipped."""
  if bad and not skip:
    assert message is not None, f'read despite undecodable {bad}'
    # Files that do not exist are refused first, before any image is decoded.
    named = [path for path in bad if not os.path.isfile(path)] or bad
    assert message.startswith(f'{len(named)} image(s) cannot be read'), message
    for path in named:
      assert path in message, (path, message)
    return
  if bad and not good:  # skip_corrupt, but nothing readable is left: refused
    assert message is not None and message.startswith(
        f'none of the {len(bad)} image(s) can be read'), message
    return
  assert message is None, message
  skipped = [n for n in got.notes if n.startswith('skipped corrupt image: ')]
  assert len(skipped) == len(bad), (skipped, bad)
  for path in bad:
    assert sum(path in note for note in skipped) == 1, (path, skipped)
  images, labels = all_pixels(got), got.parts['train'].labels
  assert len(labels) + len(skipped) == len(good) + len(bad)  # read + skipped == offered
  assert images.shape == (len(good), IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8
  assert (images == images[:, :1, :1]).all(), 'a solid image came out mixed with another'
  read = collections.Counter((int(l), tuple(int(v) for v in i[0, 0])) for l, i in
                             zip(labels, images))
  assert read == collections.Counter(good)


def write_csv_images(directory):
  """Three good PNGs (colours PALETTE[0..2]) and a corrupt one; returns {rel path: colour}."""
  (directory / 'img').mkdir()
  colours = {}
  for i in range(3):
    (directory / 'img' / f'{i}.png').write_bytes(encode_image(PALETTE[i], (5, 4), 'RGB', 'PNG'))
    colours[f'img/{i}.png'] = PALETTE[i]
  (directory / 'img' / 'bad.png').write_bytes(b'\x89PNG\r\n\x1a\n broken')
  return colours


def class_order(name):
  """The order of path,label CSV classes: ASCII numbers by value ('2' < '10'), then text."""
  numeric = name.isascii() and name.isdigit()
  return (not numeric, int(name) if numeric else 0, name)
