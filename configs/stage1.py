"""Stage 1: train the encoder with cross-entropy + lambda * supervised contrastive.

Run (the embedded digits data set, long-tailed with ratio 10; about a minute on
a 2-core CPU):

  python -m imbal_jax.main --config=configs/stage1.py --workdir=runs/digits/stage1

Expect a table of per-class recall for val and test, and DIR/report.json.
Presets: `configs/stage1.py:digits_lt` (default). Override any field on the
command line, e.g. `--config.contrastive_weight=0` for the plain CE baseline.

Where the defaults come from:
- SGD, momentum 0.9, peak learning rate 0.1 at batch 128, cosine decay with a
  linear warm-up, weight decay 5e-4: the ResNet-32 long-tail recipe of Cao et
  al. (2019, LDAM) and Kang et al. (2020, decoupling / cRT).
- temperature 0.1: Khosla et al. (2020) report 0.1 as their best for
  supervised contrastive learning.
- contrastive_weight 0.5 and a 128-dimensional projection: the weighting and
  projection size used by supervised-contrastive plug-ins in long-tail work
  (e.g. the hybrid SupCon + CE networks of Wang et al. 2021); the method's
  original value is not available to us, so treat it as a knob.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.stage = 'stage1'
  # Data.
  config.dataset = 'digits'
  config.data_dir = ''
  config.imbalance_ratio = 10.0
  config.sampler = 'instance'
  config.augment = 'crop'
  config.crop_padding = 1
  # Model.
  config.model = 'resnet32'
  config.width = 16
  config.projection_dim = 128
  # Loss.
  config.contrastive_weight = 0.5
  config.temperature = 0.1
  # Optimisation. batch_size is the GLOBAL batch over all devices and hosts.
  config.batch_size = 64
  config.num_epochs = 30
  config.learning_rate = 0.05
  config.warmup_epochs = 2
  config.momentum = 0.9
  config.weight_decay = 5e-4
  config.seed = 0
  # Bookkeeping.
  config.eval_every_epochs = 1
  config.eval_batch_size = 256
  config.log_every_steps = 20
  config.checkpoint_every_epochs = 1
  config.init_from = ''  # stage 2 only
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset = arg or 'digits_lt'
  config = base_config()
  if preset == 'digits_lt':
    # 477 training images (118 of class 0 down to 11 of class 9), 8x8 grey.
    pass
  else:
    raise ValueError(f'unknown preset {preset!r} for configs/stage1.py; known: digits_lt')
  return config
