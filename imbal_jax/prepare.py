"""Decode and resize an image-file data set once into a memory-mapped cache.

  python -m imbal_jax.prepare --dataset=isic --data_path=ISIC_2019_Training_Input \
      --labels_csv=ISIC_2019_Training_GroundTruth.csv --image_size=224 --output=data/isic2019_224

Then train with --config.dataset=prepared --config.data_path=data/isic2019_224.
The cache holds images.npy (uint8 [n, s, s, 3], read as a memory map),
labels.npy, parts.npy (0 = train, 1 = val, 2 = test) and meta.json, which is
written last: a cache without it is incomplete and is refused.
"""

import json
import pathlib
import sys

import ml_collections
import numpy as np
from absl import app, flags

from imbal_jax import configuration, reporting
from imbal_jax.data import readers, sources
from imbal_jax.data.sources import DataError

FLAGS = flags.FLAGS
flags.DEFINE_enum('dataset', None, ['folder', 'csv', 'isic'], 'Layout of the image files.')
flags.DEFINE_string('data_path', None, 'Class-folder root, path,label CSV, or ISIC image folder.')
flags.DEFINE_string('labels_csv', '', 'ISIC ground-truth CSV (dataset=isic).')
flags.DEFINE_integer('image_size', 64, 'Images are resized (shorter side) and centre-cropped.')
flags.DEFINE_integer('bit_depth', 16, '16-bit grey images keep the top 8 of this many '
                     'significant bits (12 for 12-bit X-ray exports).')
flags.DEFINE_string('output', None, 'Directory for the cache (must not hold one already).')
flags.DEFINE_bool('skip_corrupt', False, 'Leave out unreadable images (listed in meta.json).')
flags.DEFINE_string('groups_csv', '', 'ISIC metadata CSV (image, lesion_id; dataset=isic): '
                    'kept in the cache, so that carved splits keep a lesion together.')
flags.mark_flags_as_required(['dataset', 'data_path', 'output'])


def prepare(dataset: str, data_path: str, output: str, image_size: int, labels_csv: str = '',
            skip_corrupt: bool = False, groups_csv: str = '', bit_depth: int = 16) -> dict:
  """Writes the cache; returns its metadata."""
  output = pathlib.Path(output)
  if (output / 'meta.json').exists():
    raise DataError(f'{output} already holds a prepared data set; choose another --output or '
                    'delete it.')
  if not 8 <= bit_depth <= 16:
    raise DataError(f'--bit_depth={bit_depth}: the significant bits of 16-bit grey images, '
                    'from 8 to 16 (e.g. 12 for 12-bit X-ray exports).')
  if groups_csv and dataset != 'isic':
    raise DataError(f'--groups_csv applies to --dataset=isic, not {dataset!r}.')
  # Before decoding (minutes for a large set): the output folder must be writable.
  try:
    output.mkdir(parents=True, exist_ok=True)
    probe = output / '.write_test'
    probe.write_bytes(b'')
    probe.unlink()
  except OSError as error:
    raise DataError(f'--output={output} cannot be written ({type(error).__name__}: {error}); '
                    'choose a folder you can write to.') from None
  config = ml_collections.ConfigDict(dict(data_path=data_path, labels_csv=labels_csv,
                                          image_size=image_size, skip_corrupt=skip_corrupt,
                                          bit_depth=bit_depth,
                                          groups_csv=groups_csv))
  source = readers.READERS[dataset](config)
  # prepare carves no splits (the training run does, with its own fractions), but a
  # class too small for the default ones is worth knowing now, not at training time.
  # Said by the command, not kept in the cache's notes, which every training run repeats.
  # (configs/ ships with a checkout, not with an installed package: then 0.1 and 0.2.)
  defaults = configuration.default_config('stage1')
  val, test = defaults.get('val_fraction', 0.1), defaults.get('test_fraction', 0.2)
  split_warning = None
  try:
    sources.make_spec(source, None, 0, 0, val, test)
  except DataError as error:
    split_warning = (f'with the default split fractions (val {val}, test {test}), training on '
                     f'this cache would stop: {error}')
  present = [(code, source.parts[part]) for code, part in enumerate(('train', 'val', 'test'))
             if part in source.parts]
  total = sum(len(split) for _, split in present)
  # Written part by part, in chunks, straight into the file: no second copy in memory.
  images = np.lib.format.open_memmap(output / 'images.npy', mode='w+', dtype=np.uint8,
                                     shape=(total,) + tuple(present[0][1].image_shape))
  labels, parts, offset = [], [], 0
  for code, split in present:
    for start in range(0, len(split), 1024):
      rows = np.arange(start, min(start + 1024, len(split)))
      images[offset + start:offset + start + len(rows)] = split.take(rows)
    offset += len(split)
    labels.append(split.labels)
    parts.append(np.full(len(split), code, np.int8))
  images.flush()
  del images
  np.save(output / 'labels.npy', np.concatenate(labels).astype(np.int32))
  np.save(output / 'parts.npy', np.concatenate(parts))
  if source.groups is not None:  # the train part's groups (ISIC has no other part)
    np.save(output / 'groups.npy', np.asarray(source.groups, dtype=str))
  if source.paths is not None:  # the file of each image (image-file readers: one part)
    np.save(output / 'paths.npy', np.asarray(source.paths, dtype=str))
  meta = {'name': source.name, 'class_names': list(source.class_names),
          'image_size': image_size, 'bit_depth': bit_depth,
          'count': int(sum(len(l) for l in labels)),
          'class_counts': np.bincount(np.concatenate(labels),
                                      minlength=len(source.class_names)).tolist(),
          'source': {'dataset': dataset, 'data_path': str(data_path), 'labels_csv': labels_csv,
                     'groups_csv': groups_csv},
          'notes': list(source.notes), 'split_warning': split_warning}
  reporting.write_json(output / 'meta.json', meta)
  return meta


def main(argv):
  del argv
  try:
    meta = prepare(FLAGS.dataset, FLAGS.data_path, FLAGS.output, FLAGS.image_size,
                   FLAGS.labels_csv, FLAGS.skip_corrupt, FLAGS.groups_csv, FLAGS.bit_depth)
  except DataError as error:
    print(f'imbal_jax: data error: {error}', file=sys.stderr)
    sys.exit(2)
  print(json.dumps({k: meta[k] for k in ('name', 'count', 'class_names', 'class_counts')}))
  for note in meta['notes']:
    print(f'note: {note}')
  if meta['split_warning']:
    print(f'note: {meta["split_warning"]}')
  print(f'Prepared {meta["count"]} images in {FLAGS.output}; train with '
        f'--config.dataset=prepared --config.data_path={FLAGS.output}')


if __name__ == '__main__':
  app.run(main)
