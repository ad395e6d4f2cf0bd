"""The comparison command (imbal_jax.experiment): layout, shared stage-1 runs,
the table against NumPy, skipping, resuming, failures and bad input.

The runs are trained once, in-process, by the module fixture: an interrupted
first attempt, then the experiment proper (CE and CE+cRT x 2 seeds, a tiny model,
one epoch).
"""

import collections
import contextlib
import csv
import io
import json
import pathlib
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

from conftest import ROOT, mesh_over_first
from imbal_jax import configuration, experiment, experiment_plan, train
from imbal_jax import workdir as workdir_lib

# ResNet-18 traces in about half the time of ResNet-32: these runs test the bookkeeping.
TINY = ['model=resnet18', 'width=4', 'num_epochs=1', 'warmup_epochs=0']
# Two methods trained (CE's stage 1 is shared with CE+cRT); the dry run also plans a
# SupCon method, whose stage 1 is the preset's own config (contrastive_weight 0.5).
METHODS = ['CE', 'CE+cRT']
SUPCON = 'CE+0.5SupCon+cRT'
SEEDS = (0, 1)
STOP_AT = 3  # the first attempt is pre-empted after this step
STEPS = 8  # 477 digits training images, batch 64, one epoch
# The methods' result runs: CE's stage 1 is shared with CE+cRT.
RESULTS = {'CE': 'runs/contrastive_weight=0.0/seed{}/stage1',
           'CE+cRT': 'runs/contrastive_weight=0.0/seed{}/stage2'}
ALL_RUNS = sorted(path.format(seed) for path in RESULTS.values() for seed in SEEDS)
INTERRUPTED = RESULTS['CE'].format(0)


def run_command(workdir, seeds=2, methods=METHODS, overrides=TINY, **kwargs):
  """(exit status, stdout, stderr) of the command, run in this process."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = experiment.run_command('digits_lt', seeds, str(workdir), methods, overrides, **kwargs)
  return code, out.getvalue(), err.getvalue()


def read_csv(path):
  with path.open(newline='') as handle:
    return {row['method']: row for row in csv.DictReader(handle)}


def relative(root, directory):
  return str(pathlib.Path(directory).relative_to(root))


def must_not_train(*args, **kwargs):
  raise AssertionError('a run was trained')


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp('experiment')
  calls = collections.Counter()
  real_train = train.train_and_evaluate

  def counting_train(config, workdir, force=False):
    calls[relative(root, workdir)] += 1
    return real_train(config, workdir, force)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(train, 'train_and_evaluate', counting_train)
    # One of the 8 test devices: the runs test bookkeeping, and collectives on 2 cores
    # would only slow them down.
    mesh_over_first(patch, 1)
    with pytest.MonkeyPatch.context() as stop:
      # As if SIGTERM arrived during step STOP_AT of the first run.
      stop.setattr(workdir_lib.StopRequest, 'reached', lambda self, step: step >= STOP_AT)
      interrupted = run_command(root, seeds=1, methods=['CE'])
    after_interrupt = json.loads((root / 'experiment.json').read_text())
    full = run_command(root, command_line='python -m imbal_jax.experiment (test)')
  return types.SimpleNamespace(root=root, calls=calls, interrupted=interrupted,
                               after_interrupt=after_interrupt, full=full)


def test_runs_land_in_the_layout_and_stage1_is_shared(trained):
  root = trained.root
  assert trained.full[0] == 0, trained.full[2][-3000:]
  reports = sorted(relative(root, p.parent) for p in root.glob('runs/**/report.json'))
  assert reports == ALL_RUNS
  assert not list(root.glob('runs/**/report.*.json'))  # no run wrote a second report
  # Each run trained once; the interrupted one a second time, to finish.
  assert trained.calls == {run: 2 if run == INTERRUPTED else 1 for run in ALL_RUNS}
  record = json.loads((root / 'experiment.json').read_text())
  results = {m['name']: [relative(root, d) for d in m['runs']] for m in record['methods']}
  assert results == {name: [path.format(s) for s in SEEDS] for name, path in RESULTS.items()}
  for seed in SEEDS:
    stage2 = json.loads((root / RESULTS['CE+cRT'].format(seed) / 'config.json').read_text())
    assert stage2['init_from'] == str((root / RESULTS['CE'].format(seed)).resolve())
    assert stage2['seed'] == seed and stage2['num_epochs'] == 1
  by_dir = {relative(root, run['directory']): run for run in record['runs']}
  assert sorted(by_dir) == ALL_RUNS
  assert by_dir[RESULTS['CE'].format(0)]['methods'] == ['CE', 'CE+cRT']
  assert all(run['status'] == 'trained' and run['wall_s'] > 0 for run in by_dir.values())
  assert record['preset'] == 'digits_lt' and record['seeds'] == [0, 1]
  assert record['overrides']['given'] == TINY
  assert record['overrides']['applied']['stage1'] == {'model': 'resnet18', 'width': 4,
                                                      'num_epochs': 1, 'warmup_epochs': 0}
  assert 'width' not in record['overrides']['applied']['stage2']  # inherited from stage 1
  assert record['command_line'] == 'python -m imbal_jax.experiment (test)'
  assert record['machine']['device_kind'] == 'cpu' and record['machine']['platform']


def test_table_matches_numpy_over_the_report_files(trained):
  root = trained.root
  rows = read_csv(root / 'comparison.csv')
  assert list(rows) == METHODS
  for name, path in RESULTS.items():
    reports = [json.loads((root / path.format(s) / 'report.json').read_text()) for s in SEEDS]
    assert int(rows[name]['runs']) == len(SEEDS)
    for metric, values in (
        ('accuracy', [r['test']['accuracy'] for r in reports]),
        ('balanced_accuracy', [r['test']['balanced_accuracy'] for r in reports]),
        ('macro_f1', [r['test']['macro_f1'] for r in reports]),
        ('tail_accuracy', [r['test']['groups']['tail']['accuracy'] for r in reports])):
      np.testing.assert_allclose(float(rows[name][f'{metric}_mean']), np.mean(values),
                                 rtol=1e-12, atol=1e-15)
      np.testing.assert_allclose(float(rows[name][f'{metric}_std']), np.std(values, ddof=1),
                                 rtol=1e-12, atol=1e-15)
  table = (root / 'comparison.md').read_text()
  for name in METHODS:
    assert f'\n| {name} | 2 |' in table
  assert 'overrides for every run: model=resnet18 width=4 num_epochs=1 warmup_epochs=0.' in table
  assert (root / 'comparison.png').read_bytes().startswith(b'\x89PNG')


def test_interrupted_run_resumes_from_its_checkpoint(trained):
  code, _, err = trained.interrupted
  assert code == workdir_lib.PREEMPTED_EXIT_CODE
  assert 'rerun the same command' in err
  assert [run['status'] for run in trained.after_interrupt['runs']] == ['interrupted']
  assert f'Resuming stage1 from step {STOP_AT}' in trained.full[1]
  record = json.loads((trained.root / 'experiment.json').read_text())
  resumed = {relative(trained.root, run['directory']) for run in record['runs'] if run['resumed']}
  assert resumed == {INTERRUPTED}
  lines = (trained.root / INTERRUPTED / 'metrics.jsonl').read_text().splitlines()
  steps = [json.loads(line)['step'] for line in lines]
  assert steps[0] == 1 and steps[-1] == STEPS and steps == sorted(set(steps))


def test_rerun_skips_finished_runs(trained, monkeypatch):
  root = trained.root
  before = json.loads((root / 'experiment.json').read_text())
  mtimes = {path: path.stat().st_mtime_ns for path in root.glob('runs/**/report.json')}
  monkeypatch.setattr(train, 'train_and_evaluate', must_not_train)
  code, out, err = run_command(root)
  assert code == 0, err
  assert out.count('finished earlier') == len(ALL_RUNS)
  assert {path: path.stat().st_mtime_ns for path in root.glob('runs/**/report.json')} == mtimes
  after = json.loads((root / 'experiment.json').read_text())
  assert [run['status'] for run in after['runs']] == ['done_before'] * len(ALL_RUNS)
  assert [run['wall_s'] for run in after['runs']] == [run['wall_s'] for run in before['runs']]
  assert list(read_csv(root / 'comparison.csv')) == METHODS


def test_dry_run_lists_runs_and_commands_and_trains_nothing(trained, tmp_path, monkeypatch):
  monkeypatch.setattr(train, 'train_and_evaluate', must_not_train)
  fresh = tmp_path / 'fresh'
  code, out, _ = run_command(fresh, methods=METHODS + [SUPCON], dry_run=True)
  assert code == 0 and not fresh.exists()
  commands = [line.strip() for line in out.splitlines() if 'imbal_jax.main' in line]
  # The SupCon method trains its own stage 1 (the preset's config) and stage 2.
  assert len(commands) == len(ALL_RUNS) + 2 * len(SEEDS)
  for seed in SEEDS:
    for stage in ('stage1', 'stage2'):
      assert sum(f'--workdir={fresh / f"runs/preset/seed{seed}/{stage}"}' in c.split()
                 for c in commands) == 1
  first = commands[0].split()
  assert first[:4] == ['python', '-m', 'imbal_jax.main', '--config=configs/stage1.py:digits_lt']
  assert f'--workdir={fresh / RESULTS["CE"].format(0)}' in first
  assert {'--config.contrastive_weight=0.0', '--config.width=4', '--config.num_epochs=1',
          '--config.seed=0'} <= set(first)
  assert f'--config.init_from={fresh / RESULTS["CE"].format(0)}' in commands[1].split()
  assert '[1/8] stage1 seed 0 for CE, CE+cRT: to train' in out
  _, out, _ = run_command(trained.root, dry_run=True)
  assert out.count(': finished\n') == len(ALL_RUNS)


def test_failed_run_is_reported_and_the_others_go_on(trained, tmp_path, monkeypatch):
  """CE's stage 1 of seed 0 fails; its stage 2 is blocked; every other run finishes."""
  root = tmp_path / 'failing'

  def fake_train(config, workdir, force=False):
    run = relative(root, workdir)
    if run == INTERRUPTED:
      raise FloatingPointError('non-finite loss (test)')
    shutil.copytree(trained.root / run, workdir)  # a finished run, as if trained here

  monkeypatch.setattr(train, 'train_and_evaluate', fake_train)
  code, _, err = run_command(root)
  assert code == 1
  assert f'{root / INTERRUPTED} (CE, CE+cRT): FloatingPointError: non-finite loss' in err
  assert f'{root / RESULTS["CE+cRT"].format(0)} (CE+cRT): its stage-1 run' in err
  record = json.loads((root / 'experiment.json').read_text())
  statuses = {relative(root, run['directory']): run['status'] for run in record['runs']}
  assert statuses == {run: 'failed' if run == INTERRUPTED else
                      'blocked' if run == RESULTS['CE+cRT'].format(0) else 'trained'
                      for run in ALL_RUNS}
  rows = read_csv(root / 'comparison.csv')
  assert {name: int(row['runs']) for name, row in rows.items()} == {
      'CE': 1, 'CE+cRT': 1}
  assert '2 of 4 runs not finished.' in (root / 'comparison.md').read_text()


@pytest.mark.parametrize('preset, seeds, methods, overrides, message', [
    ('nope', 2, None, [], "--preset='nope' is not known; choose one of digits_lt"),
    ('digits_lt', 0, None, [], '--seeds=0'),
    ('digits_lt', 2, ['CE+crt'], [], 'did you mean CE+cRT?'),
    ('digits_lt', 2, METHODS, ['widht=4'], "'widht' is not a config field; did you mean width?"),
    ('digits_lt', 2, METHODS, ['width=four'], "'four' is not a int"),
    ('digits_lt', 2, METHODS, ['num_epochs'], 'write FIELD=VALUE'),
    ('digits_lt', 2, METHODS, ['num_epochs=0'], 'config.num_epochs=0 must be > 0'),
    ('digits_lt', 2, METHODS, ['seed=3'], 'the experiment sets seed'),
    ('digits_lt', 2, METHODS, ['stage2.width=4'], 'stage 2 inherits width'),
    ('digits_lt', 2, METHODS, ['loss=focal'], 'conflicts with method CE'),
    # Stage-2 values are checked before stage 1 trains, against the planned stage-1 config.
    ('digits_lt', 2, METHODS, ['stage2.num_epochs=0'],
     'CE+cRT (stage 2): config.num_epochs=0 must be > 0'),
    ('digits_lt', 2, METHODS, ['stage2.stage2_method=bogus'],
     "config.stage2_method='bogus' is not known"),
    # 'none' is None only where None can be meant; a number field must have a number.
    ('digits_lt', 2, METHODS, ['num_epochs=none'], 'config.num_epochs=None: give it an int value (default 30)'),
    ('digits_lt', 2, METHODS, ['frequency_groups=none'], "config.frequency_groups='none': use"),
    ('digits_lt', 2, METHODS, ['stage2.loss=focal'], 'stage 2 trains its head with cross-entropy'),
])
def test_bad_input_is_one_config_error(tmp_path, monkeypatch, preset, seeds, methods, overrides,
                                       message):
  monkeypatch.setattr(train, 'train_and_evaluate', must_not_train)
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = experiment.run_command(preset, seeds, str(tmp_path / 'x'), methods, overrides)
  assert code == 2
  assert err.getvalue().startswith('imbal_jax.experiment: config error: ')
  assert message in err.getvalue()
  assert not (tmp_path / 'x').exists()


def test_none_is_a_value_of_text_fields(tmp_path):
  parsed = experiment_plan.parse_overrides(
      ['augment=none', 'imbalance_ratio=none'],
      {stage: configuration.load_config_file(configuration.CONFIGS / f'{stage}.py',
                                             f'test_none_{stage}').get_config('digits_lt')
       for stage in ('stage1', 'stage2')})
  assert parsed['stage1'] == {'augment': 'none', 'imbalance_ratio': None}
  assert parsed['stage2'] == {'augment': 'none'}


def test_a_dataset_override_keeps_its_data_as_it_is_unless_a_ratio_is_given(tmp_path):
  plan = experiment_plan.plan_experiment('digits_lt', 1, tmp_path / 'x', ['CE'],
                                         ['dataset=csv', 'data_path=list.csv', 'image_size=8'])
  [run] = plan.runs
  assert run.config.imbalance_ratio is None and '--config.imbalance_ratio=None' in run.command
  plan = experiment_plan.plan_experiment('digits_lt', 1, tmp_path / 'y', ['CE'],
                                         ['dataset=csv', 'data_path=list.csv', 'image_size=8',
                                          'imbalance_ratio=4'])
  assert plan.runs[0].config.imbalance_ratio == 4


def test_a_plain_loss_override_is_stage1s():
  bases = {stage: configuration.load_config_file(configuration.CONFIGS / f'{stage}.py',
                                                 f'test_loss_{stage}').get_config('digits_lt')
           for stage in ('stage1', 'stage2')}
  parsed = experiment_plan.parse_overrides(['loss=focal', 'focal_gamma=1.0'], bases)
  assert parsed['stage1'] == {'loss': 'focal', 'focal_gamma': 1.0}
  assert parsed['stage2'] == {'focal_gamma': 1.0}  # unused by stage 2, and harmless


def test_missing_data_stops_the_experiment_at_its_first_run(tmp_path):
  root = tmp_path / 'no_data'
  code, _, err = run_command(root, overrides=TINY + [
      'dataset=medmnist', f'data_path={tmp_path / "missing.npz"}'])
  assert code == 2 and 'imbal_jax.experiment: data error: ' in err
  record = json.loads((root / 'experiment.json').read_text())
  statuses = [run['status'] for run in record['runs']]
  assert statuses == ['failed'] + ['pending'] * (len(ALL_RUNS) - 1)
  assert 'missing.npz' in record['runs'][0]['error']


def test_a_multi_process_launch_is_refused_before_training(tmp_path, monkeypatch):
  monkeypatch.setattr(train, 'train_and_evaluate', must_not_train)
  for key, value in {'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': 'node[1-2]',
                     'SLURM_NTASKS': '2', 'SLURM_PROCID': '0', 'SLURM_LOCALID': '0'}.items():
    monkeypatch.setenv(key, value)
  code, _, err = run_command(tmp_path / 'slurm', overrides=TINY)
  assert code == 2
  assert ('imbal_jax.experiment: launch error: started as one of several processes (by SLURM)'
          in err)


def test_workdir_of_another_experiment_is_refused(trained, monkeypatch):
  monkeypatch.setattr(train, 'train_and_evaluate', must_not_train)
  code, _, err = run_command(trained.root, overrides=TINY + ['stage2.num_epochs=2'])
  assert code == 2 and 'holds an experiment with overrides' in err


def test_command_line_reports_a_bad_method_with_status_2(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'imbal_jax.experiment', '--preset=digits_lt', '--methods=CE,XYZ',
       f'--workdir={tmp_path / "x"}'], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr
  assert "config error: --methods: 'XYZ' is not a method" in result.stderr
  assert 'Traceback' not in result.stderr


def test_every_preset_plans_the_standard_table(tmp_path):
  assert experiment_plan.preset_names() == ['digits_lt', 'fashion_mnist_lt', 'ham10000']
  has_stage2_method = 'stage2_method' in configuration.default_config('stage2')
  stage2_variants = ['CE+tau-norm', 'CE+LWS', 'CE+NCM', 'CE+posthoc-LA']
  for preset in experiment_plan.preset_names():
    plan = experiment_plan.plan_experiment(preset, 1, tmp_path)
    names = [m.name for m in plan.methods]
    assert names[:7] == ['CE', 'CE+cRT', 'focal', 'CB', 'LDAM-DRW', 'logit-adjusted',
                         'balanced-softmax']
    for title in ('SupCon', 'BalSupCon', 'Triplet', 'ClassCenter'):
      assert f'CE+0.5{title}+cRT' in names
    assert {'CE+0.1SupCon+cRT', 'CE+1SupCon+cRT'} <= set(names)  # with CE+cRT: lambda 0..1
    assert 'SupCon+cRT' in names  # SupCon-only pre-training
    ce_stage1 = plan.results['CE'][0]
    if has_stage2_method:
      assert plan.unavailable == {}
      for name in stage2_variants:
        assert plan.results[name][0].stage1 is ce_stage1  # one CE run serves them all
      assert ce_stage1.methods == ['CE', 'CE+cRT'] + stage2_variants
    else:
      assert sorted(plan.unavailable) == sorted(stage2_variants)
      assert all("no field 'stage2_method'" in why for why in plan.unavailable.values())
    # Thirteen distinct stage-1 configs; every other row re-uses one of them.
    assert sum(run.stage == 'stage1' for run in plan.runs) == 13


def test_methods_with_the_same_runs_are_refused(tmp_path, monkeypatch):
  (tmp_path / 'digits_lt.py').write_text(
      'def get_methods():\n'
      "  return [{'name': 'A', 'stage1': {'contrastive_weight': 0.0}, 'stage2': None},\n"
      "          {'name': 'B', 'stage1': {'contrastive_weight': 0.0, 'loss': 'ce'},"
      " 'stage2': None}]\n")
  monkeypatch.setattr(experiment_plan, 'EXPERIMENTS', tmp_path)
  with pytest.raises(experiment_plan.ExperimentError, match='methods A and B are the same runs'):
    experiment_plan.plan_experiment('digits_lt', 1, tmp_path / 'x')
