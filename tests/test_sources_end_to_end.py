"""Each file-based source trains through both stages (tiny data written here)."""

import json

import numpy as np
import pytest
from PIL import Image

from imbal_jax import prepare, train
from test_configuration import load_config

TINY = dict(width=4, num_epochs=1, warmup_epochs=0, batch_size=16, eval_batch_size=16,
            log_every_steps=5, augment='rrc+flip+vflip+rot90+jitter')


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


@pytest.mark.parametrize('kind', ['prepared'])  # the cache is written by the folder reader
def test_class_folders_train_both_stages(tmp_path, kind):
  write_class_folders(tmp_path / 'images')
  path = tmp_path / 'images'
  if kind == 'prepared':
    prepare.prepare('folder', str(path), str(tmp_path / 'cache'), image_size=8)
    path = tmp_path / 'cache'
  stage1, stage2 = two_stages(tmp_path, dataset=kind, data_path=str(path))
  for report in (stage1, stage2):
    assert report['class_names'] == ['class_0', 'class_1', 'class_2']
    assert sum(report['split_sizes'].values()) == 48  # nothing dropped
    assert report['test']['num_examples'] == report['split_sizes']['test']
  assert stage2['train_counts'] == stage1['train_counts']
