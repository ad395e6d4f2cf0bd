"""Both stages on real data sets, where they are present (skipped cleanly elsewhere).

- HAM10000 at 28 px in MedMNIST layout: ../shared/data/ham10000_28.npz (development
  and CI machines of this project; never in the repository).
- Fashion-MNIST IDX files from Debian's dataset-fashion-mnist package, which
  .ci/run installs.
"""

import json
import pathlib

import pytest

from conftest import ROOT
from test_end_to_end import read_jsonl, run_main

HAM10000 = ROOT.parent / 'shared' / 'data' / 'ham10000_28.npz'
FASHION_MNIST = pathlib.Path('/usr/share/datasets/fashion-mnist')
# One epoch at batch 256 with light augmentation, ResNet-18 at width 4 (the cheapest
# model to compile): the point is the real files through both stages, not accuracy,
# and the suite must stay quick on 2 cores.
SHORT = ['--config.model=resnet18', '--config.num_epochs=1', '--config.warmup_epochs=0',
         '--config.batch_size=256',
         '--config.eval_batch_size=1024', '--config.log_every_steps=10', '--config.augment=flip']
# Two forced devices keep the data-parallel path while sparing a 2-core machine the
# overhead of eight.
DEVICES = 2


def two_stages(tmp_path, preset, *overrides, stage2=()):
  run_main(f'configs/stage1.py:{preset}', tmp_path / 'stage1', *SHORT, *overrides,
           num_devices=DEVICES)
  run_main(f'configs/stage2.py:{preset}', tmp_path / 'stage2', *SHORT, *stage2,
           f'--config.init_from={tmp_path / "stage1"}', num_devices=DEVICES)
  return [json.loads((tmp_path / s / 'report.json').read_text()) for s in ('stage1', 'stage2')]


@pytest.mark.skipif(not HAM10000.exists(), reason=f'{HAM10000} is not present')
def test_ham10000_two_stages(tmp_path):
  sidecar = json.loads(HAM10000.with_suffix('.json').read_text())
  stage1, stage2 = two_stages(tmp_path, 'ham10000', f'--config.data_path={HAM10000}')
  for report in (stage1, stage2):
    assert report['class_names'] == sidecar['classes']
    # Natural imbalance kept: the training counts are the file's own.
    assert report['train_counts'] == [sidecar['per_class_counts']['train'][c]
                                      for c in sidecar['classes']]
    assert report['split_sizes'] == sidecar['split_sizes']
    assert report['test']['num_examples'] == sidecar['split_sizes']['test']
  assert read_jsonl(tmp_path / 'stage1' / 'metrics.jsonl')[0]['step'] == 1


@pytest.mark.skipif(not FASHION_MNIST.exists(), reason=f'{FASHION_MNIST} is not present '
                    '(apt-get install dataset-fashion-mnist)')
def test_fashion_mnist_lt_two_stages(tmp_path):
  # A 3 % validation split (1,800 images) keeps the test quick; 10,000 test images stay.
  # Stage 2 on cached features: the 14,600 training images pass the encoder once.
  stage1, stage2 = two_stages(tmp_path, 'fashion_mnist_lt', '--config.val_fraction=0.03',
                              stage2=['--config.cache_features=True'])
  counts = stage1['train_counts']
  assert counts[0] / counts[-1] == pytest.approx(100, rel=0.02)
  assert stage1['split_sizes']['test'] == 10_000
  # The validation split is carved from the 60,000 training images before subsampling.
  assert stage1['split_sizes']['val'] == 1_800
  assert stage2['train_counts'] == counts
