"""Bad configs stop before any data is loaded or anything compiled, with one clear message."""

import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import ROOT
from imbal_jax import configuration, train


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(f'cfg_{name}', ROOT / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize('field,value,message', [
    ('dataset', 'imagenet', r"config.dataset='imagenet' is not known"),
    ('augment', 'crop+mixup', r"config.augment='crop\+mixup': unknown operation"),
    ('val_fraction', 1.5, r'config.val_fraction=1.5 must be between 0 and 1'),
    ('model', 'vgg', r"config.model='vgg' is not known"),
    ('sampler', 'random', r"config.sampler='random' is not known"),
    ('learning_rate', -0.1, r'config.learning_rate=-0.1 must be > 0'),
    ('temperature', 0.0, r'config.temperature=0.0 must be > 0'),
    ('imbalance_ratio', 0.5, r'config.imbalance_ratio=0.5 must be >= 1'),
    ('batch_size', 12, r'config.batch_size=12 is the GLOBAL batch .* 8 devices'),
])
def test_invalid_stage1_fields_raise_config_error(tmp_path, field, value, message):
  config = load_config('stage1')
  config[field] = value
  with pytest.raises(configuration.ConfigError, match=message):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()  # nothing written


def test_stage2_without_init_from(tmp_path):
  with pytest.raises(configuration.ConfigError, match='stage 2 needs config.init_from'):
    train.train_and_evaluate(load_config('stage2'), str(tmp_path / 'run'))


def test_stage2_init_from_missing_or_without_checkpoint(tmp_path):
  config = load_config('stage2')
  config.init_from = str(tmp_path / 'nowhere')
  with pytest.raises(configuration.ConfigError, match='is not a directory'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  (tmp_path / 'empty').mkdir()
  config.init_from = str(tmp_path / 'empty')
  with pytest.raises(configuration.ConfigError, match='holds no stage-1 checkpoint'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))


def test_stage2_refuses_data_fields_that_differ_from_stage1(tmp_path):
  stage1_dir = tmp_path / 'stage1'
  (stage1_dir / 'best' / '10').mkdir(parents=True)
  saved = load_config('stage1').to_dict()
  (stage1_dir / 'config.json').write_text(json.dumps(saved))
  config = load_config('stage2')
  config.init_from = str(stage1_dir)
  config.imbalance_ratio = 100.0
  with pytest.raises(configuration.ConfigError, match='imbalance_ratio=100.0 differs'):
    configuration.resolve(config)
  config.imbalance_ratio = None
  assert configuration.resolve(config).imbalance_ratio == saved['imbalance_ratio']


def test_main_rejects_unknown_config_field(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'imbal_jax.main', '--config=configs/stage1.py',
       f'--workdir={tmp_path}/run', '--config.no_such_field=1'],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert 'no_such_field' in result.stderr
  assert not (tmp_path / 'run').exists()


def test_main_reports_config_error_without_traceback(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'imbal_jax.main', '--config=configs/stage1.py',
       f'--workdir={tmp_path}/run', '--config.model=resnet1000'],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert "config error: config.model='resnet1000' is not known" in result.stderr
  assert 'Traceback' not in result.stderr


def test_metric_only_encoder_needs_a_metric_loss_weight():
  config = load_config('stage1')
  config.update(classification_trains_encoder=False, contrastive_weight=0.0)
  with pytest.raises(configuration.ConfigError, match='config.contrastive_weight=0'):
    configuration.resolve(config)
  config.contrastive_weight = 1.0
  assert not configuration.resolve(config).classification_trains_encoder
