"""Both stages on long-tailed Fashion-MNIST from Debian's IDX files (skipped where the
dataset-fashion-mnist package is absent; .ci/run installs it)."""

import pathlib

import pytest

from test_real_data import two_stages

FASHION_MNIST = pathlib.Path('/usr/share/datasets/fashion-mnist')


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
