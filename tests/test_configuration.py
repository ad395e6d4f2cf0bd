"""Bad configs stop before any data is loaded or anything compiled, with one clear message."""

import importlib.util
import json
import subprocess
import sys

import numpy as np
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
    ('val_fraction', 1.5, r'config.val_fraction=1.5 must be strictly between 0 and 1'),
    ('test_fraction', 0.0, r'config.test_fraction=0.0 must be strictly between 0 and 1'),
    ('bit_depth', 20, r'config.bit_depth=20: the significant bits of 16-bit grey images'),
    ('num_epochs', 2, r'config.warmup_epochs=2 must be smaller than config.num_epochs=2: set '
                      r'--config.warmup_epochs=1 \(0: no warm-up\) or more epochs'),
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


def test_stage2_needs_a_finished_stage1(tmp_path):
  stage1_dir = tmp_path / 'stage1'
  (stage1_dir / 'best' / '10').mkdir(parents=True)  # evaluated once, then interrupted
  (stage1_dir / 'config.json').write_text(json.dumps(load_config('stage1').to_dict()))
  config = load_config('stage2')
  config.init_from = str(stage1_dir)
  with pytest.raises(configuration.ConfigError, match=r'stage 1 has not finished there \(no '
                     r'report.json.*rerun its command'):
    configuration.resolve(config)
  (stage1_dir / 'report.json').write_text('{}')
  assert configuration.resolve(config).init_from == str(stage1_dir)


def test_stage2_continues_only_on_the_stage1_model_it_started_from(tmp_path):
  from imbal_jax import workdir
  run = tmp_path / 'stage2'
  run.mkdir()
  now = {'step': 8, 'score': 0.5, 'variables_sha256': 'aa'}
  record = workdir.check_stage1_unchanged(run, tmp_path / 's1', now)
  assert record == {'init_from': str(tmp_path / 's1'), 'selected_step': 8, 'selected_score': 0.5,
                    'selected_variables_sha256': 'aa'}
  (run / workdir.STAGE1_RECORD).write_text(json.dumps(record))
  workdir.check_stage1_unchanged(run, tmp_path / 's1', now)  # the same
  # Moved or copied elsewhere: the same model.
  workdir.check_stage1_unchanged(run, tmp_path / 'copy_of_s1', now)
  with pytest.raises(workdir.WorkdirError, match=r'changed since the stage-2 run .* started: its '
                     r'selected model was step 8 \(score 0.5\), now step 40 \(score 0.7\)'):
    workdir.check_stage1_unchanged(run, tmp_path / 's1', {'step': 40, 'score': 0.7,
                                                          'variables_sha256': 'bb'})
  # Trained again, selecting the same step with the same score: the weights decide.
  with pytest.raises(workdir.WorkdirError, match=r'its selected model \(step 8\) holds other '
                     'weights than when this run started'):
    workdir.check_stage1_unchanged(run, tmp_path / 's1', {**now, 'variables_sha256': 'bb'})
  # A record from before the hash was kept: step and score only.
  del record['selected_variables_sha256']
  (run / workdir.STAGE1_RECORD).write_text(json.dumps(record))
  workdir.check_stage1_unchanged(run, tmp_path / 's1', {**now, 'variables_sha256': 'bb'})


def test_variables_sha256_sees_values_shapes_dtypes_and_names():
  import jax.numpy as jnp
  from imbal_jax import checkpoint
  tree = {'a': jnp.arange(4.0), 'b': {'c': np.ones((2, 2), np.float32)}}
  base = checkpoint.variables_sha256(tree)
  assert checkpoint.variables_sha256({'b': {'c': np.ones((2, 2), np.float32)},
                                      'a': jnp.arange(4.0)}) == base
  for other in ({**tree, 'a': jnp.arange(4.0).at[3].set(3.5)},
                {**tree, 'a': jnp.arange(4.0).reshape(2, 2)},
                {**tree, 'a': jnp.arange(4.0, dtype=jnp.bfloat16)},
                {'x': tree['a'], 'b': tree['b']}):
    assert checkpoint.variables_sha256(other) != base


def test_stage2_refuses_data_fields_that_differ_from_stage1(tmp_path):
  stage1_dir = tmp_path / 'stage1'
  (stage1_dir / 'best' / '10').mkdir(parents=True)
  (stage1_dir / 'report.json').write_text('{}')  # finished
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


@pytest.mark.parametrize('args, message', [
    (['--config=configs/stage1.py:ham1000'],
     "--config=configs/stage1.py:ham1000: unknown preset 'ham1000'; choose one of digits_lt, "
     'ham10000'),
    (['--config=configs/stage3.py'], f'--config=configs/stage3.py: configs/stage3.py is not a '
     f'file (relative to the current directory {ROOT}); name {ROOT / "configs" / "stage1.py"}'),
    (['--config=configs/stage1.py', '--config.num_epochs=abc'], '--config.num_epochs=abc'),
    (['--config', 'configs/stage3.py'], '--config=configs/stage3.py: configs/stage3.py is not a '
     'file'),
])
def test_main_reports_a_bad_config_flag_in_one_line(tmp_path, args, message):
  result = subprocess.run([sys.executable, '-m', 'imbal_jax.main', f'--workdir={tmp_path}/run',
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.startswith('imbal_jax: config error: ') and message in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1
  assert not (tmp_path / 'run').exists()


def test_imbalance_ratio_none_on_the_command_line():
  # absl cannot parse None for a float flag; the command line sets it all the same.
  code = ('import sys; from imbal_jax import main; main.parse_flags(sys.argv); '
          'print(repr(main.FLAGS.config.imbalance_ratio), main.FLAGS.config.num_epochs)')
  for spelling in ('None', 'none', 'null', ''):
    result = subprocess.run(
        [sys.executable, '-c', code, '--config=configs/stage1.py', '--workdir=unused',
         f'--config.imbalance_ratio={spelling}', '--config.num_epochs=3'],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ['None', '3'], result.stderr[-2000:]


def test_a_presets_ratio_stays_with_its_data_set_on_the_command_line():
  code = ('import sys; from imbal_jax import main; main.parse_flags(sys.argv); '
          'print(repr(main.FLAGS.config.imbalance_ratio))')
  cases = [  # (config, flags, the ratio, whether the note is printed)
      ('configs/stage1.py', ['--config.dataset=folder', '--config.data_path=x'], 'None', True),
      (None, ['--config', 'configs/stage1.py', '--config.dataset=folder'], 'None', True),
      ('configs/stage1.py', ['--config.dataset=folder', '--config.imbalance_ratio=5'], '5.0',
       False),
      ('configs/stage1.py:fashion_mnist_lt', ['--config.dataset=idx'], '100.0', False),
      ('configs/stage1.py', [], '10.0', False)]
  for config, extra, ratio, noted in cases:
    result = subprocess.run([sys.executable, '-c', code,
                             *([f'--config={config}'] if config else []), '--workdir=unused',
                             *extra],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = result.stdout.splitlines()
    assert lines[-1] == ratio, (config, extra, result.stdout, result.stderr[-2000:])
    assert any(line.startswith("note: config.imbalance_ratio=10 is the preset's, for its data "
                               "set 'digits'; with config.dataset='folder'") for line in lines) \
        == noted, lines


def test_keep_ratio_for_its_data_leaves_chosen_ratios_and_stage2_alone():
  config = load_config('stage1')
  config.dataset = 'csv'
  assert configuration.keep_ratio_for_its_data(config, 'digits', {'dataset'}) is not None
  assert config.imbalance_ratio is None
  for overridden in ({'data_path'}, {'dataset', 'imbalance_ratio'}):
    config = load_config('stage1')
    config.dataset = 'csv'
    assert configuration.keep_ratio_for_its_data(config, 'digits', overridden) is None
    assert config.imbalance_ratio == 10
  config = load_config('stage2')
  assert configuration.keep_ratio_for_its_data(config, 'digits', {'dataset'}) is None


def test_metric_only_encoder_needs_a_metric_loss_weight():
  config = load_config('stage1')
  config.update(classification_trains_encoder=False, contrastive_weight=0.0)
  with pytest.raises(configuration.ConfigError, match='config.contrastive_weight=0'):
    configuration.resolve(config)
  config.contrastive_weight = 1.0
  assert not configuration.resolve(config).classification_trains_encoder


def saved_run(tmp_path, config: dict):
  (tmp_path / 'config.json').write_text(json.dumps(config))
  return tmp_path


@pytest.mark.parametrize('stage', ['stage1', 'stage2'])
def test_default_config_is_the_config_file_with_no_preset(stage):
  assert configuration.default_config(stage) == load_config(stage).to_dict()


def test_a_run_written_before_a_field_existed_resumes_with_its_default(tmp_path):
  from imbal_jax import workdir
  config = load_config('stage1', 'ham10000').to_dict()
  old = {k: v for k, v in config.items() if k not in ('batch_pairs', 'grad_accum_steps')}
  run = saved_run(tmp_path, old)
  defaults = configuration.default_config('stage1')
  assert (defaults['batch_pairs'], defaults['grad_accum_steps']) == (False, 1)
  workdir.check_config(run, config, force=False, defaults=defaults)  # no error
  # Without the defaults, the missing fields differ.
  with pytest.raises(workdir.WorkdirError, match=r'batch_pairs: None in the workdir, False now'):
    workdir.check_config(run, config, force=False)
  # A value other than the default is a different run.
  with pytest.raises(workdir.WorkdirError,
                     match=r'grad_accum_steps: None in the workdir, 2 now') as raised:
    workdir.check_config(run, {**config, 'grad_accum_steps': 2}, force=False, defaults=defaults)
  assert 'batch_pairs' not in str(raised.value)
  # A field the saved run holds must agree, default or not.
  run = saved_run(tmp_path, {**config, 'batch_pairs': True})
  with pytest.raises(workdir.WorkdirError, match=r'batch_pairs: True in the workdir, False now'):
    workdir.check_config(run, config, force=False, defaults=defaults)


def test_eval_batch_size_matters_only_where_it_draws_cached_feature_views(tmp_path):
  from imbal_jax import workdir
  config = load_config('stage2').to_dict()
  run = saved_run(tmp_path, config)
  workdir.check_config(run, {**config, 'eval_batch_size': 8}, force=False)  # no error
  views = {**config, 'cache_features': True, 'feature_views': 2}
  run = saved_run(tmp_path, views)
  with pytest.raises(workdir.WorkdirError, match=r'eval_batch_size: \d+ in the workdir, 8 now'):
    workdir.check_config(run, {**views, 'eval_batch_size': 8}, force=False)
  workdir.check_config(run, {**views, 'log_every_steps': 3}, force=False)  # still harmless


def test_force_cannot_change_the_data_or_the_state_shapes(tmp_path):
  from imbal_jax import train, workdir
  config = load_config('stage1').to_dict()
  run = saved_run(tmp_path, config)
  changed = {**config, 'imbalance_ratio': 100.0, 'temperature': 0.2}
  with pytest.raises(workdir.WorkdirError, match='pass --force'):
    workdir.check_config(run, changed, force=False, fixed=train.FIXED_FIELDS)
  # The saved split was drawn at ratio 10: forcing would record 100 over ratio-10 data.
  with pytest.raises(workdir.WorkdirError,
                     match=r'--force cannot change these fields.*\n  imbalance_ratio: 10.0 in the '
                           r'workdir, 100.0 now\nStart a fresh --workdir') as raised:
    workdir.check_config(run, changed, force=True, fixed=train.FIXED_FIELDS)
  assert 'temperature' not in str(raised.value)
  workdir.check_config(run, {**config, 'temperature': 0.2}, force=True, fixed=train.FIXED_FIELDS)
  assert {'stage2_method', 'model', 'seed', 'data_path'} <= set(train.FIXED_FIELDS)


def test_a_workdir_that_is_a_file_is_refused_before_any_work(tmp_path, monkeypatch):
  from imbal_jax import train, workdir
  (tmp_path / 'afile').write_text('kept')
  monkeypatch.setattr(train, 'load_dataset', lambda *a: pytest.fail('data was loaded'))
  for target in (tmp_path / 'afile', tmp_path / 'afile' / 'run'):
    with pytest.raises(workdir.WorkdirError, match=f'{tmp_path / "afile"} is a file, not a dir'):
      train.train_and_evaluate(load_config('stage1'), str(target))
  assert (tmp_path / 'afile').read_text() == 'kept'


def test_stage2_inherits_skip_corrupt_and_keeps_cross_entropy(tmp_path):
  stage1_dir = tmp_path / 'stage1'
  (stage1_dir / 'best' / '10').mkdir(parents=True)
  (stage1_dir / 'report.json').write_text('{}')
  saved = load_config('stage1').to_dict()
  saved['skip_corrupt'] = True  # stage 1 left unreadable images out; stage 2 must too
  (stage1_dir / 'config.json').write_text(json.dumps(saved))
  config = load_config('stage2')
  config.init_from = str(stage1_dir)
  assert configuration.resolve(config).skip_corrupt is True
  config.loss = 'focal'
  with pytest.raises(configuration.ConfigError, match="config.loss='focal': stage 2 trains its "
                     'head with cross-entropy'):
    configuration.resolve(config)


def test_step_schedule_matches_cao_et_al_and_checks_its_epochs():
  from imbal_jax import stages
  config = load_config('stage1', 'cifar10_lt')
  assert (config.lr_schedule, config.lr_decay_epochs, config.lr_decay_factor) == (
      'step', '160,180', 0.01)
  schedule = stages.learning_rate_schedule(config, steps_per_epoch=10)
  # Cao et al.'s adjust_learning_rate, per step: a linear warm-up over 5 epochs from 0,
  # then lr 0.1, times 0.01 from epoch 160, times 0.0001 from epoch 180.
  def reference(step):
    if step < 50:
      return 0.1 * step / 50
    return 0.1 * (1.0 if step < 1600 else 0.01 if step < 1800 else 0.0001)
  for step in (0, 1, 25, 49, 50, 51, 1000, 1599, 1600, 1601, 1799, 1800, 1999):
    np.testing.assert_allclose(float(schedule(step)), reference(step), rtol=1e-5, atol=1e-12)
  config.warmup_epochs = 0
  no_warmup = stages.learning_rate_schedule(config, 10)
  assert [float(no_warmup(s)) for s in (0, 1599, 1600, 1800)] == pytest.approx(
      [0.1, 0.1, 0.001, 0.00001])
  # Stage 2 re-trains its head on the cosine schedule, whatever stage 1's preset.
  assert load_config('stage2', 'cifar10_lt').lr_schedule == 'cosine'
  for epochs, message in (('180,160', 'ascending'), ('x', 'ascending'), ('', 'ascending'),
                          ('3,180', 'must lie after config.warmup_epochs=5'),
                          ('160,200', 'before config.num_epochs=200')):
    bad = load_config('stage1', 'cifar10_lt')
    bad.lr_decay_epochs = epochs
    with pytest.raises(configuration.ConfigError, match=f'lr_decay_epochs.*{message}'):
      configuration.resolve(bad)
  bad = load_config('stage1', 'cifar10_lt')
  bad.lr_schedule = 'linear'
  with pytest.raises(configuration.ConfigError, match='lr_schedule'):
    configuration.resolve(bad)


def test_stage2_notes_a_preset_other_than_its_stage1s():
  stage1 = load_config('stage1', 'dermamnist')
  assert stage1.preset == 'dermamnist' and load_config('stage1').preset == 'digits_lt'
  note = train.stage2_preset_note(load_config('stage2'), stage1.to_dict())
  assert note.startswith("stage 2 takes its training settings from preset 'digits_lt'")
  assert '--config=configs/stage2.py:dermamnist' in note
  assert train.stage2_preset_note(load_config('stage2', 'dermamnist'), stage1.to_dict()) is None
  older = {k: v for k, v in stage1.to_dict().items() if k != 'preset'}  # before the field
  assert train.stage2_preset_note(load_config('stage2'), older) is None
  # Only a label: a workdir of another preset's name but the same fields is not refused.
  from imbal_jax import workdir
  assert 'preset' in workdir.HARMLESS_FIELDS
