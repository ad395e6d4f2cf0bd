"""report.json dicts as train.py writes them, built with metrics.summarize on
random predictions, for the reporting and comparison tests."""

import json
import pathlib
import warnings

import numpy as np

from imbal_jax import metrics

CLASS_NAMES = ['nevus', 'melanoma', 'keratosis', 'carcinoma', 'dermatofibroma', 'vascular']
TRAIN_COUNTS = [300, 120, 60, 30, 12, 5]


def predictions(rng, num_examples, skill, absent=()):
  """Labels (every class but `absent`) and probabilities, better than chance by `skill`."""
  classes = np.setdiff1d(np.arange(len(CLASS_NAMES)), absent)
  labels = rng.permutation(np.resize(classes, num_examples))
  logits = rng.normal(size=(num_examples, len(CLASS_NAMES)))
  logits[np.arange(num_examples), labels] += skill
  probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  return labels, probabilities


def config(stage='stage1', seed=0, contrastive_weight=0.5, **overrides):
  """The fields of configs/stage1.py that matter here."""
  return {'stage': stage, 'dataset': 'digits', 'data_dir': '', 'imbalance_ratio': 10.0,
          'sampler': 'instance' if stage == 'stage1' else 'class_balanced', 'model': 'resnet32',
          'contrastive_weight': contrastive_weight if stage == 'stage1' else 0.0,
          'temperature': 0.1, 'learning_rate': 0.05, 'num_epochs': 30, 'seed': seed,
          'log_every_steps': 20, 'eval_batch_size': 256, 'init_from': '', **overrides}


def fake_report(seed=0, stage='stage1', skill=2.0, test_absent=(), class_names=CLASS_NAMES,
                **config_overrides):
  """(report, calibration) as train.py would have them."""
  rng = np.random.default_rng(seed)
  report = {'stage': stage, 'dataset': 'digits', 'class_names': list(class_names),
            'train_counts': TRAIN_COUNTS, 'split_sizes': {'train': 527, 'val': 120, 'test': 240},
            'selection': {'step': 90, 'epoch': 6, 'split': 'val', 'metric': 'balanced_accuracy',
                          'score': 0.5}}
  calibration = {}
  for split, size, absent in (('val', 120, ()), ('test', 240, test_absent)):
    labels, probabilities = predictions(rng, size, skill, absent)
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')  # an absent class is intended here
      report[split] = metrics.summarize(labels, probabilities, class_names, TRAIN_COUNTS)
    calibration[split] = metrics.calibration_bins(labels, probabilities)
  report['config'] = config(stage, seed, **config_overrides)
  report['environment'] = {'jax': '0.10.2'}
  if stage == 'stage2':
    report['init_from'] = report['config']['init_from']
  return report, calibration


def write_run(directory, report):
  """A run directory as train.py leaves it: report.json and config.json."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / 'report.json').write_text(json.dumps(report))
  (directory / 'config.json').write_text(json.dumps(report['config']))
  return directory
