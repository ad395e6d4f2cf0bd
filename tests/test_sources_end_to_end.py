"""Each file-based source trains through both stages (tiny data written here)."""

import json

import numpy as np
import pytest
from PIL import Image

from imbal_jax import prepare, run_data, train
from test_configuration import load_config
from test_readers import write_tiny_tfds

TINY = dict(model='resnet18', width=4, num_epochs=1, warmup_epochs=0, batch_size=16,
            eval_batch_size=16, log_every_steps=5, augment='rrc+flip+vflip+rot90+jitter')


def write_class_folders(root, counts=(30, 12, 6)):
  rng = np.random.default_rng(0)
  for label, count in enumerate(counts):
    for i in range(count):
      path = root / f'class_{label}' / f'{i}.png'
      path.parent.mkdir(parents=True, exist_ok=True)
      base = np.zeros((10, 12, 3), np.uint8)
      base[..., label] = 200  # each class has its own colour
      noise = rng.integers(0, 40, base.shape, dtype=np.uint8)
      Image.fromarray(base + noise).save(path)


def two_stages(tmp_path, **data_fields):
  stage1 = load_config('stage1')
  stage1.update(imbalance_ratio=None, image_size=8, val_fraction=0.2, test_fraction=0.2,
                **TINY, **data_fields)
  train.train_and_evaluate(stage1, str(tmp_path / 'stage1'))
  stage2 = load_config('stage2')
  stage2.update(init_from=str(tmp_path / 'stage1'), num_epochs=1, batch_size=16,
                eval_batch_size=16, log_every_steps=5)
  train.train_and_evaluate(stage2, str(tmp_path / 'stage2'))
  return [json.loads((tmp_path / s / 'report.json').read_text()) for s in ('stage1', 'stage2')]


def write_csv_list(root, counts=(30, 12, 6)):
  """The class folders of `write_class_folders`, listed in a path,label CSV."""
  write_class_folders(root / 'images', counts)
  rows = ['path,label'] + [f'{path.relative_to(root)},{path.parent.name}'
                           for path in sorted((root / 'images').rglob('*.png'))]
  (root / 'list.csv').write_text('\n'.join(rows) + '\n')
  return root / 'list.csv'


def write_isic(root, counts=(30, 12, 6)):
  """ISIC layout: one image folder and a ground-truth CSV of one-hot class columns."""
  write_class_folders(root / 'folders', counts)
  rows = ['image,MEL,NV,BCC']
  for i, path in enumerate(sorted((root / 'folders').rglob('*.png'))):
    target = root / 'images' / f'ISIC_{i:07d}.png'
    target.parent.mkdir(parents=True, exist_ok=True)
    path.rename(target)
    onehot = ['0.0'] * 3
    onehot[int(path.parent.name.split('_')[1])] = '1.0'
    rows.append(f'ISIC_{i:07d},' + ','.join(onehot))
  (root / 'gt.csv').write_text('\n'.join(rows) + '\n')
  return root / 'images', root / 'gt.csv'


# Every source gives 8x8 RGB images of 3 classes at batch 16: one compiled program serves all.
@pytest.mark.parametrize('kind', ['prepared', 'csv', 'isic', 'tfds'])
def test_each_file_source_trains_both_stages(tmp_path, kind):
  fields = {}
  if kind == 'prepared':  # the cache is written from class folders (the folder reader)
    write_class_folders(tmp_path / 'images')
    prepare.prepare('folder', str(tmp_path / 'images'), str(tmp_path / 'cache'), image_size=8)
    fields = dict(data_path=str(tmp_path / 'cache'))
    names, total = ['class_0', 'class_1', 'class_2'], 48
  elif kind == 'csv':
    fields = dict(data_path=str(write_csv_list(tmp_path)))
    names, total = ['class_0', 'class_1', 'class_2'], 48
  elif kind == 'isic':
    images, labels = write_isic(tmp_path)
    fields = dict(data_path=str(images), labels_csv=str(labels))
    names, total = ['MEL', 'NV', 'BCC'], 48
  else:
    write_tiny_tfds(tmp_path / 'tfds')
    fields = dict(tfds_name='tiny_lt_images', data_dir=str(tmp_path / 'tfds'))
    names, total = ['cat', 'dog', 'eel'], 75
  stage1, stage2 = two_stages(tmp_path, dataset=kind, **fields)
  for report in (stage1, stage2):
    assert report['class_names'] == names
    assert sum(report['split_sizes'].values()) == total  # nothing dropped
    assert report['test']['num_examples'] == report['split_sizes']['test']
  if kind == 'isic':  # the CSV's one-hot columns, in file order: 30, 12 and 6 images
    assert sum(stage1['train_counts']) == stage1['split_sizes']['train']
  assert stage2['train_counts'] == stage1['train_counts']
  # eval_predictions.csv: every val and test image once, its file where the source has one.
  import csv
  with (tmp_path / 'stage2' / 'eval_predictions.csv').open() as handle:
    rows = list(csv.DictReader(handle))
  for split in ('val', 'test'):
    mine = [r for r in rows if r['split'] == split]
    assert [int(r['row']) for r in mine] == list(range(stage2['split_sizes'][split]))
    assert np.mean([int(r['correct']) for r in mine]) == pytest.approx(
        stage2[split]['accuracy'], abs=1e-12)
  assert len({(r['source_part'], r['source_row']) for r in rows}) == len(rows)
  for row in rows:
    assert row['label_name'] == names[int(row['label'])]
    if kind == 'tfds':
      assert row['path'] == ''
    else:  # each class has its own colour channel: the file is the row's image
      pixels = np.asarray(Image.open(row['path']).convert('RGB'), np.float64)
      assert int(pixels.mean(axis=(0, 1)).argmax()) == int(row['label']), row


def test_an_image_added_to_the_folder_is_refused_on_resume(tmp_path):
  # The saved splits are row positions: one more image shifts every later row, so
  # saved test images would be read as training images. The run refuses instead.
  write_class_folders(tmp_path / 'images', counts=(20, 20))
  config = load_config('stage1')
  config.update(dataset='folder', data_path=str(tmp_path / 'images'), image_size=8,
                imbalance_ratio=None, val_fraction=0.2, test_fraction=0.2)
  workdir = tmp_path / 'run'
  workdir.mkdir()
  dataset = run_data.load_dataset(config, workdir)
  (workdir / 'data.json').write_text(json.dumps(run_data.describe_data(dataset, config.seed)))
  resumed = run_data.load_dataset(config, workdir)  # unchanged data: the same splits
  for split in ('train', 'val', 'test'):
    np.testing.assert_array_equal(resumed.splits[split].index, dataset.splits[split].index)
  Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / 'images' / 'class_0' / '00.png')
  with pytest.raises(train.sources.DataError, match=r"config.dataset='folder' at .*images "
                     r"changed since .*data.json was written: its images \(all of them, "
                     r"before the splits are carved\) were 40, now 41"):
    run_data.load_dataset(config, workdir)


def test_pixel_statistics_match_numpy_over_chunks(tmp_path, monkeypatch):
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (50, 4, 5, 3), dtype=np.uint8)
  images[..., 2] = 7  # a constant channel: its std is floored, not zero
  split = train.sources.Split(images, np.zeros(50, np.int32))
  monkeypatch.setattr(run_data, 'PIXEL_CHUNK', 8)  # several chunks, the last one short
  monkeypatch.setattr(run_data, 'PIXEL_SAMPLE', 30)  # a sample of the split, seeded
  mean, std = run_data.pixel_statistics(split, seed=3)
  rows = np.sort(np.random.default_rng(3).permutation(50)[:30])
  reference = images[rows].astype(np.float64) / 255.0
  np.testing.assert_allclose(mean, reference.mean(axis=(0, 1, 2)), rtol=1e-12)
  np.testing.assert_allclose(std[:2], reference.std(axis=(0, 1, 2))[:2], rtol=1e-12)
  assert std[2] == 1e-3


def test_stage2_normalises_with_the_stage1_statistics(tmp_path):
  # Stage 2 feeds the stage-1 encoder, so it reuses the statistics stage 1 trained with
  # rather than recomputing them from its own seed's sample.
  (tmp_path / 'data.json').write_text(json.dumps({'pixel_mean': [0.1, 0.2, 0.3],
                                                  'pixel_std': [0.4, 0.5, 0.6]}))
  config = load_config('stage2')
  config.update(init_from=str(tmp_path))
  assert run_data.stage1_pixel_stats(config) == ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
  assert run_data.stage1_pixel_stats(load_config('stage1')) is None
  dataset = train.sources.load(load_config('stage1'))  # digits
  info = run_data.describe_data(dataset, 0, run_data.stage1_pixel_stats(config))
  assert (info['pixel_mean'], info['pixel_std']) == ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])


def test_long_tail_subsampling_is_noted_with_its_counts():
  config = load_config('stage1')  # digits, imbalance_ratio 10
  dataset = train.sources.load(config)
  kept, val, test = (len(dataset.splits[s]) for s in ('train', 'val', 'test'))
  assert (f'config.imbalance_ratio=10 subsampled the training split to {kept} of its '
          f'{1797 - val - test} images') in dataset.notes[-1]
  config.imbalance_ratio = None
  dataset = train.sources.load(config)
  assert len(dataset.splits['train']) == 1797 - val - test
  assert not any('imbalance_ratio' in note for note in dataset.notes)


def test_stage2_run_hands_the_stage1_statistics_to_its_data(tmp_path, monkeypatch):
  # train_and_evaluate itself passes them on: stopped where the data is described,
  # before anything is compiled or trained.
  stage1 = tmp_path / 'stage1'
  (stage1 / 'best' / '1').mkdir(parents=True)  # as a finished stage-1 run has
  (stage1 / 'report.json').write_text('{}')  # finished
  (stage1 / 'config.json').write_text(json.dumps(load_config('stage1').to_dict()))
  described = run_data.describe_data(run_data.sources.load(load_config('stage1')), 0)  # digits
  described.update(pixel_mean=[0.1, 0.2, 0.3], pixel_std=[0.4, 0.5, 0.6])
  (stage1 / 'data.json').write_text(json.dumps(described))
  seen = []

  class Described(Exception):
    pass

  def describe_data(dataset, seed, pixel_stats=None):
    seen.append(pixel_stats)
    raise Described

  monkeypatch.setattr(train, 'describe_data', describe_data)
  config = load_config('stage2')
  config.update(init_from=str(stage1))
  with pytest.raises(Described):
    train.train_and_evaluate(config, str(tmp_path / 'stage2'))
  with pytest.raises(Described):
    train.train_and_evaluate(load_config('stage1'), str(tmp_path / 'other_stage1'))
  assert seen == [([0.1, 0.2, 0.3], [0.4, 0.5, 0.6]), None]


def write_lesions(root, images_per_lesion=3):
  """ISIC's metadata CSV for write_isic's 48 images: lesions of 3 consecutive images (one
  class each), the last image of each class without a lesion_id."""
  rows = ['image,age_approx,lesion_id']
  for i, count in enumerate((30, 12, 6)):
    first = sum((30, 12, 6)[:i])
    for j in range(count - 1):
      rows.append(f'ISIC_{first + j:07d},45,L{i}_{j // images_per_lesion}')
    rows.append(f'ISIC_{first + count - 1:07d},50,')
  (root / 'meta.csv').write_text('\n'.join(rows) + '\n')
  return root / 'meta.csv'


def lesion_sets(dataset, groups_of):
  return {split: {groups_of[i] for i in dataset.splits[split].index.tolist()}
          for split in train.sources.SPLITS}


def test_isic_lesions_stay_in_one_split_directly_and_through_a_prepared_cache(tmp_path):
  images, labels = write_isic(tmp_path)
  groups_csv = write_lesions(tmp_path)
  config = load_config('stage1')
  config.update(dataset='isic', data_path=str(images), labels_csv=str(labels),
                groups_csv=str(groups_csv), image_size=8, imbalance_ratio=None,
                val_fraction=0.2, test_fraction=0.3)
  config = train.configuration.resolve(config)
  source = train.sources.load(config)
  assert any('3 image(s) without a lesion_id, each its own group' in n for n in source.notes)
  metadata = [line.split(',') for line in groups_csv.read_text().splitlines()[1:]]
  groups_of = [lesion or f'alone:{image}' for image, _, lesion in metadata]  # row order = ids
  seen = lesion_sets(source, groups_of)
  assert not seen['train'] & seen['test'] and not seen['train'] & seen['val']
  assert not seen['val'] & seen['test']
  # The same through prepare: the cache keeps the groups.
  prepare.prepare('isic', str(images), str(tmp_path / 'cache'), image_size=8,
                  labels_csv=str(labels), groups_csv=str(groups_csv))
  config.update(dataset='prepared', data_path=str(tmp_path / 'cache'), labels_csv='',
                groups_csv='')
  cached = train.sources.load(config)
  for split in train.sources.SPLITS:
    np.testing.assert_array_equal(cached.splits[split].index, source.splits[split].index)
  # Without the groups the split is by image: here it separates some lesion's images.
  config.update(dataset='isic', data_path=str(images), labels_csv=str(labels), groups_csv='')
  by_image = lesion_sets(train.sources.load(config), groups_of)
  assert by_image['train'] & (by_image['test'] | by_image['val'])


def test_groups_csv_is_refused_where_it_does_not_apply(tmp_path):
  config = load_config('stage1')
  config.update(groups_csv=str(tmp_path / 'meta.csv'))  # the default data set, digits
  with pytest.raises(train.configuration.ConfigError, match='groups_csv applies to '
                     "dataset=isic .* not 'digits'"):
    train.configuration.resolve(config)
  with pytest.raises(train.sources.DataError, match="--groups_csv applies to --dataset=isic"):
    prepare.prepare('folder', str(tmp_path), str(tmp_path / 'cache'), image_size=8,
                    groups_csv=str(tmp_path / 'meta.csv'))
  assert not (tmp_path / 'cache').exists()  # refused before creating anything


def test_image_size_of_a_stored_data_set_must_match_it():
  config = load_config('stage1')  # digits: 8x8, not resized by any reader
  config.image_size = 32
  with pytest.raises(train.sources.DataError, match=r'config.image_size=32, but digits holds 8x8 '
                     r'images, and only image-file data sets \(folder, csv, isic\) are resized: '
                     r'set --config.image_size=8'):
    train.sources.load(config)
  config.image_size = 8
  assert train.sources.load(config).image_shape == (8, 8, 1)
