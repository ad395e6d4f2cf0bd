"""Stage 2: a new classifier on the frozen stage-1 encoder (default: cRT).

Run after stage 1:

  python -m imbal_jax.main --config=configs/stage2.py --workdir=runs/digits/stage2 \
      --config.init_from=runs/digits/stage1

By default a new linear head is trained with cross-entropy and class-balanced
sampling; the encoder's parameters and batch statistics stay exactly as stage
1 left them (batch norm in inference mode). Expect the same report as stage 1,
with the tail classes' recall usually higher.

`--config.stage2_method` chooses the classifier (imbal_jax/classifiers.py):
  crt         classifier re-training: a new linear head, class-balanced sampling
              (Kang et al. 2020, "Decoupling representation and classifier for
              long-tailed recognition").
  lws         learnable weight scaling: the stage-1 classifier frozen, one scale
              per class (init 1) trained with class-balanced sampling (Kang et al.
              2020).
  tau_norm    tau-normalised classifier: no training; the stage-1 classifier with
              class c's weights and bias divided by ||w_c||^tau (Kang et al. 2020,
              who drop the bias; scaling it keeps tau=0 exactly stage 1).
  posthoc_la  post-hoc logit adjustment: no training; stage-1 logits minus
              tau * log(training class frequency) (Menon et al. 2021, "Long-tail
              learning via logit adjustment", eq. 9).
  ncm         nearest class mean: no training; cosine similarity between the
              L2-normalised features and the training class means, times 16
              (Kang et al. 2020).
tau_norm and posthoc_la take tau from 0, tau_grid_step, ... tau_grid_max, the
value with the best validation balanced accuracy (the report's stage2 entry
lists every score). The closed-form methods take seconds: the report is
written without a training loop.

`--config.cache_features=True` (crt, lws) runs the frozen encoder once over the
training images and trains the head on those features: much faster, and with
the default `feature_views=1` the same as training on images with
augment='none'. `feature_views=N` adds N-1 augmented views (config.augment)
of every training image, one drawn per sampled image and step.

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
  for field in ('dataset', 'data_dir', 'data_path', 'labels_csv', 'groups_csv', 'tfds_name',
                'model'):
    config[field] = config_dict.placeholder(str)
  for field in ('image_size', 'split_seed', 'width', 'projection_dim', 'bit_depth'):
    config[field] = config_dict.placeholder(int)
  for field in ('imbalance_ratio', 'val_fraction', 'test_fraction'):
    config[field] = config_dict.placeholder(float)
  config.skip_corrupt = config_dict.placeholder(bool)
  config.sampler = 'class_balanced'
  config.batch_pairs = False  # no metric loss in stage 2
  config.contrastive_weight = 0.0
  config.num_epochs = 10
  config.learning_rate = 0.05
  config.warmup_epochs = 0
  config.lr_schedule = 'cosine'  # as Kang et al. (2020) re-train the classifier
  config.lr_decay_epochs = ''
  config.weight_decay = 5e-4
  config.init_from = ''
  config.stage2_method = 'crt'  # crt | lws | tau_norm | posthoc_la | ncm
  config.tau_grid_max = 2.0  # tau_norm, posthoc_la: tau in 0, step, ..., max
  config.tau_grid_step = 0.1
  config.cache_features = False  # crt, lws: train the head on precomputed features
  config.feature_views = 1  # with cache_features: 1 plain + (N - 1) augmented views
  return config
