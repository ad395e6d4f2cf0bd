"""Stage 2: classifier re-training (cRT) on the frozen stage-1 encoder.

Run after stage 1:

  python -m imbal_jax.main --config=configs/stage2.py --workdir=runs/digits/stage2 \
      --config.init_from=runs/digits/stage1

A new linear head is trained with cross-entropy and class-balanced sampling;
the encoder's parameters and batch statistics stay exactly as stage 1 left
them (batch norm in inference mode). Expect the same report as stage 1, with
the tail classes' recall usually higher.

Data and model fields (dataset, data_dir, imbalance_ratio, model, width) are
taken from the stage-1 run; set them here only to check they match.

Defaults: 10 epochs with class-balanced sampling and a cosine schedule,
following cRT in Kang et al. (2020), "Decoupling representation and
classifier for long-tailed recognition".
"""

import importlib.util
import pathlib

import ml_collections
from ml_collections import config_dict

# Load the sibling file by path: config files are loaded by path, not as a package.
_spec = importlib.util.spec_from_file_location(
    'imbal_jax_configs_stage1', pathlib.Path(__file__).with_name('stage1.py'))
stage1 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stage1)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  # Any stage-1 preset works: its optimisation settings are the starting point.
  config = stage1.get_config(arg)
  config.stage = 'stage2'
  # Inherited from the stage-1 run unless set (then they must agree): the data,
  # its split and the encoder must be exactly those of stage 1.
  for field in ('dataset', 'data_dir', 'data_path', 'labels_csv', 'tfds_name', 'model'):
    config[field] = config_dict.placeholder(str)
  for field in ('image_size', 'split_seed', 'width', 'projection_dim'):
    config[field] = config_dict.placeholder(int)
  for field in ('imbalance_ratio', 'val_fraction', 'test_fraction'):
    config[field] = config_dict.placeholder(float)
  config.sampler = 'class_balanced'
  config.contrastive_weight = 0.0
  config.num_epochs = 10
  config.learning_rate = 0.05
  config.warmup_epochs = 0
  config.weight_decay = 5e-4
  config.init_from = ''
  return config
