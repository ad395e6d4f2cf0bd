"""Config validation and stage-2 inheritance, done before any data or compile.

Every problem is reported as one ConfigError naming the field and the fix.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import jax
import ml_collections

from imbal_jax import classifiers, objectives
from imbal_jax.data import augment, readers, samplers
from imbal_jax.models import resnet

STAGES = ('stage1', 'stage2')
# Fields a stage-2 run takes from its stage-1 run ('' / 0 means "inherit").
INHERITED_FIELDS = ('dataset', 'data_dir', 'data_path', 'labels_csv', 'groups_csv',
                    'tfds_name', 'image_size', 'bit_depth', 'imbalance_ratio', 'split_seed',
                    'val_fraction', 'test_fraction', 'skip_corrupt', 'model', 'width',
                    'projection_dim')


# The config files (configs/stage1.py, configs/stage2.py, configs/experiments/).
CONFIGS = pathlib.Path(__file__).resolve().parents[1] / 'configs'


def load_config_file(path: pathlib.Path, module_name: str):
  """A config file as a module, loaded by path as config files are (not as a package)."""
  spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def keep_ratio_for_its_data(config, preset_dataset: str, overridden) -> str | None:
  """A stage-1 preset's imbalance_ratio subsamples the preset's own data set. Where
  `overridden` (the fields set on the command line) names another config.dataset
  and no imbalance_ratio, the ratio is dropped (None: the data as it is), and the
  returned note says so; otherwise None and `config` is left as it is.

  Without this the default preset's ratio 10 (digits) would quietly cut a user's
  own folder of images down to a long-tail profile, its rarest class first.
  """
  if (config.get('stage') != 'stage1' or 'dataset' not in overridden
      or 'imbalance_ratio' in overridden or config.dataset == preset_dataset
      or config.get('imbalance_ratio') is None):
    return None
  ratio, config.imbalance_ratio = config.imbalance_ratio, None
  return (f"config.imbalance_ratio={ratio:g} is the preset's, for its data set "
          f"{preset_dataset!r}; with config.dataset={config.dataset!r} the training split is "
          'kept as it is (imbalance_ratio=None). Set --config.imbalance_ratio=R to subsample '
          'it to the long-tail profile of ratio R.')


def default_config(stage: str) -> dict:
  """configs/STAGE.py's config with no preset named, as a dict; {} without the file."""
  path = CONFIGS / f'{stage}.py'
  if stage not in STAGES or not path.is_file():
    return {}
  return load_config_file(path, f'imbal_jax_defaults_{stage}').get_config().to_dict()


# Fields whose None is a setting: imbalance_ratio=None keeps the data's own imbalance.
NULLABLE_FIELDS = ('imbalance_ratio',)


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field and the fix."""


def _check_choice(config, field: str, choices) -> None:
  value = config[field]
  if value not in choices:
    raise ConfigError(f'config.{field}={value!r} is not known; choose one of {sorted(choices)}.')


def _check_positive(config, field: str, allow_zero: bool = False) -> None:
  value = config[field]
  if value < 0 or (value == 0 and not allow_zero):
    bound = '>= 0' if allow_zero else '> 0'
    raise ConfigError(f'config.{field}={value} must be {bound}.')


def stage1_run(init_from: str) -> tuple[pathlib.Path, dict]:
  """The stage-1 run directory named by `init_from` and its saved config."""
  if not init_from:
    raise ConfigError('stage 2 needs config.init_from: the workdir of a finished stage-1 run, '
                      'e.g. --config.init_from=runs/digits/stage1.')
  run_dir = pathlib.Path(init_from)
  config_path = run_dir / 'config.json'
  if not run_dir.is_dir():
    raise ConfigError(f'config.init_from={init_from!r} is not a directory; point it at the '
                      'workdir of a stage-1 run.')
  if not config_path.is_file() or not (run_dir / 'best').is_dir():
    raise ConfigError(f'config.init_from={init_from!r} holds no stage-1 checkpoint '
                      f'(no {config_path.name} and best/); run stage 1 with '
                      f'--workdir={init_from} first.')
  saved = json.loads(config_path.read_text())
  if saved.get('stage') != 'stage1':
    raise ConfigError(f'config.init_from={init_from!r} is a {saved.get("stage")!r} run, not '
                      'stage 1; point it at the stage-1 workdir.')
  if not any(p.is_dir() and p.name.isdigit() for p in (run_dir / 'best').iterdir()):
    raise ConfigError(f'config.init_from={init_from!r} has no finished stage-1 checkpoint in '
                      'best/; let stage 1 run to its first evaluation.')
  if not (run_dir / 'report.json').is_file():
    # An interrupted stage 1 would hand stage 2 an encoder it later replaces.
    raise ConfigError(f'config.init_from={init_from!r}: stage 1 has not finished there (no '
                      'report.json, which it writes at the end); rerun its command with '
                      f'--workdir={init_from} to finish it, then stage 2.')
  return run_dir, saved


def decay_epochs(text: str) -> list[int]:
  """config.lr_decay_epochs, 'E1,E2,...', as ascending epochs; ValueError if not."""
  epochs = [int(part) for part in str(text).split(',') if part.strip()]
  if not epochs or epochs != sorted(set(epochs)) or epochs[0] < 1:
    raise ValueError(text)
  return epochs


def _is_threshold_pair(text: str) -> bool:
  try:
    high, low = (float(x) for x in text.split(','))
  except ValueError:
    return False
  return 0 <= low <= high


def resolve(config: ml_collections.ConfigDict,
            stage1_config: dict | None = None) -> ml_collections.ConfigDict:
  """Validates `config`; for stage 2, fills inherited fields from the stage-1 run.

  `stage1_config` (stage 2 only) stands in for the stage-1 run's saved config, e.g.
  to check a planned stage 2 before its stage 1 has trained.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  _check_choice(config, 'stage', STAGES)
  if config.stage == 'stage2':
    if stage1_config is None:
      _, stage1_config = stage1_run(config.init_from)
    for field in INHERITED_FIELDS:
      inherited = stage1_config.get(field)
      if config[field] is None or config[field] == '':
        config[field] = inherited
      elif config[field] != inherited:
        raise ConfigError(
            f'config.{field}={config[field]!r} differs from the stage-1 run '
            f'({inherited!r}, in {config.init_from}/config.json); stage 2 must use the same '
            f'data and encoder: drop the override.')
  defaults = default_config(config.stage)
  # None means something only for NULLABLE_FIELDS and, in stage 2, the inherited
  # fields ("as the stage-1 run", filled above).
  nullable = set(NULLABLE_FIELDS) | (set(INHERITED_FIELDS) if config.stage == 'stage2' else set())
  for field, value in config.items():
    if value is None and field not in nullable and defaults.get(field) is not None:
      default = defaults[field]
      kind = type(default).__name__
      raise ConfigError(f'config.{field}=None: give it a{"n" if kind[0] in "aeiou" else ""} '
                        f'{kind} value (default {default!r}), or leave the field out.')
  _check_choice(config, 'dataset', readers.READERS)
  if config.get('groups_csv') and config.dataset != 'isic':
    raise ConfigError(f'config.groups_csv applies to dataset=isic (a prepared ISIC cache keeps '
                      f'the groups it was prepared with), not {config.dataset!r}: leave it empty.')
  _check_choice(config, 'model', resnet.ARCHITECTURES)
  _check_choice(config, 'sampler', samplers.SAMPLERS)
  _check_choice(config, 'loss', objectives.CLASSIFICATION_LOSSES)
  _check_choice(config, 'metric_loss', objectives.METRIC_LOSSES)
  _check_choice(config, 'num_views', (1, 2))
  # The compute dtype of convolutions and matmuls; each stage chooses its own.
  _check_choice(config, 'dtype', ('float32', 'bfloat16'))
  if not 0 <= config.cb_beta < 1:
    raise ConfigError(f'config.cb_beta={config.cb_beta} must be in [0, 1).')
  for field in ('margin', 'focal_gamma', 'ldam_max_margin', 'ldam_scale', 'logit_adjust_tau'):
    _check_positive(config, field, allow_zero=True)
  if not 0 <= config.center_momentum <= 1:
    raise ConfigError(f'config.center_momentum={config.center_momentum} must be in [0, 1].')
  try:
    augment.parse(config.augment)
  except ValueError as error:
    raise ConfigError(str(error)) from None
  for field in ('batch_size', 'eval_batch_size', 'num_epochs', 'learning_rate', 'temperature',
                'log_every_steps', 'eval_every_epochs', 'checkpoint_every_epochs',
                'projection_dim'):
    _check_positive(config, field)
  for field in ('contrastive_weight', 'weight_decay', 'momentum', 'warmup_epochs',
                'crop_padding', 'width', 'image_size', 'data_workers'):
    _check_positive(config, field, allow_zero=True)
  if config.batch_pairs and config.batch_size % 2:
    raise ConfigError(f'config.batch_pairs=True pairs images of one class, so config.batch_size '
                      f'must be even; got {config.batch_size}: use {config.batch_size + 1}.')
  accum = config.grad_accum_steps
  if accum < 1:
    raise ConfigError(f'config.grad_accum_steps={accum} must be >= 1 (1: no accumulation).')
  if accum > 1 and config.stage != 'stage1':
    raise ConfigError(f'config.grad_accum_steps={accum}: gradient accumulation is for stage 1 '
                      '(stage 2 trains only a linear head); set it to 1.')
  # Every micro-batch is split over all devices, as the batch is.
  if accum > 1 and config.batch_size % (accum * jax.device_count()):
    per_step = accum * jax.device_count()
    raise ConfigError(
        f'config.batch_size={config.batch_size} must be divisible by config.grad_accum_steps='
        f'{accum} times the {jax.device_count()} devices ({per_step}); change either, e.g. '
        f'config.batch_size={max(per_step, config.batch_size - config.batch_size % per_step)}.')
  if config.stage == 'stage2' and config.loss != 'ce':
    raise ConfigError(f'config.loss={config.loss!r}: stage 2 trains its head with cross-entropy '
                      'on class-balanced batches (its rebalancing is the sampler and the '
                      "stage2_method); the loss applies to stage 1. Leave it at 'ce'.")
  if (config.stage == 'stage1' and not config.classification_trains_encoder
      and config.contrastive_weight == 0):
    raise ConfigError('config.classification_trains_encoder=False leaves the encoder to the '
                      'metric loss, but config.contrastive_weight=0: set a positive weight.')
  groups = config.frequency_groups
  if groups not in ('terciles', 'oltr') and not _is_threshold_pair(groups):
    raise ConfigError(f"config.frequency_groups={groups!r}: use 'terciles', 'oltr' or two "
                      "training-count thresholds 'HIGH,LOW' such as '100,20'.")
  for field in ('val_fraction', 'test_fraction'):
    if not 0 < config[field] < 1:
      raise ConfigError(f'config.{field}={config[field]} must be strictly between 0 and 1 '
                        '(every run needs a validation and a test split).')
  if config.imbalance_ratio is not None and config.imbalance_ratio < 1:
    raise ConfigError(f'config.imbalance_ratio={config.imbalance_ratio} must be >= 1 '
                      '(largest class count / smallest), or None to keep the distribution '
                      'as it is.')
  if 'bit_depth' in config and not 8 <= config.bit_depth <= 16:
    raise ConfigError(f'config.bit_depth={config.bit_depth}: the significant bits of 16-bit '
                      'grey images, from 8 to 16 (e.g. 12 for 12-bit X-ray exports).')
  _check_choice(config, 'lr_schedule', ('cosine', 'step'))
  if config.lr_schedule == 'step':
    try:
      epochs = decay_epochs(config.lr_decay_epochs)
    except ValueError:
      raise ConfigError(f'config.lr_decay_epochs={config.lr_decay_epochs!r}: with '
                        "config.lr_schedule='step', give the epochs the learning rate drops "
                        "at, ascending and comma-separated, e.g. '160,180'.") from None
    if epochs[0] <= config.warmup_epochs or epochs[-1] >= config.num_epochs:
      raise ConfigError(f'config.lr_decay_epochs={config.lr_decay_epochs!r} must lie after '
                        f'config.warmup_epochs={config.warmup_epochs} and before '
                        f'config.num_epochs={config.num_epochs}.')
    _check_positive(config, 'lr_decay_factor')
  if config.warmup_epochs >= config.num_epochs and config.warmup_epochs > 0:
    raise ConfigError(f'config.warmup_epochs={config.warmup_epochs} must be smaller than '
                      f'config.num_epochs={config.num_epochs}: set --config.warmup_epochs='
                      f'{max(0, config.num_epochs - 1)} (0: no warm-up) or more epochs.')
  if config.stage == 'stage2':
    _check_choice(config, 'stage2_method', classifiers.METHODS)
    _check_positive(config, 'tau_grid_max', allow_zero=True)
    _check_positive(config, 'tau_grid_step')
    _check_positive(config, 'feature_views')
    if config.feature_views > 1 and not config.cache_features:
      raise ConfigError(f'config.feature_views={config.feature_views} sets how many views of '
                        'each training image are cached; set config.cache_features=True too, '
                        'or feature_views=1.')
    if config.feature_views > 1 and not augment.parse(config.augment):
      raise ConfigError(f'config.feature_views={config.feature_views} with config.augment='
                        f"{config.augment!r} would cache identical views; name augmentations "
                        "(e.g. --config.augment=crop+flip) or set feature_views=1.")
  return config
