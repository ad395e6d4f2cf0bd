"""The comparison of runs (imbal_jax.comparison) and its command (imbal_jax.report)."""

import csv
import subprocess
import sys

import numpy as np
import pytest

import fake_runs
from conftest import ROOT
from imbal_jax import comparison


def read_csv(path):
  with path.open(newline='') as handle:
    return list(csv.DictReader(handle))


@pytest.fixture
def runs(tmp_path):
  """Three seeds of stage 1 at lambda 0.5, two at lambda 0 (weaker), one cRT run."""
  directories = {}
  for seed in range(3):
    report, _ = fake_runs.fake_report(seed=seed, contrastive_weight=0.5, skill=2.0)
    directories[f'supcon{seed}'] = fake_runs.write_run(tmp_path / f'supcon/seed{seed}', report)
  for seed in range(2):
    report, _ = fake_runs.fake_report(seed=10 + seed, contrastive_weight=0.0, skill=1.0,
                                      test_absent=(5,) if seed else ())
    report['config']['seed'] = seed
    directories[f'ce{seed}'] = fake_runs.write_run(tmp_path / f'ce/seed{seed}', report)
  report, _ = fake_runs.fake_report(seed=20, stage='stage2', skill=2.5,
                                    init_from=str(directories['supcon0']))
  directories['crt0'] = fake_runs.write_run(tmp_path / 'crt/seed0', report)
  return directories


def reports_of(directories):
  return [comparison.load_run(d).report for d in directories]


def test_methods_means_and_stds_match_numpy(runs, tmp_path):
  order = ['supcon0', 'ce0', 'supcon1', 'crt0', 'supcon2', 'ce1']
  methods, paths = comparison.compare([runs[name] for name in order], tmp_path / 'out')
  assert [m.name for m in methods] == ['stage1 lambda=0.5', 'stage1 lambda=0',
                                       'stage2 (cRT) lambda=0.5']
  members = {'stage1 lambda=0.5': ['supcon0', 'supcon1', 'supcon2'],
             'stage1 lambda=0': ['ce0', 'ce1'], 'stage2 (cRT) lambda=0.5': ['crt0']}
  assert [[run.directory for run in m.runs] for m in methods] == [
      [runs[name] for name in members[m.name]] for m in methods]
  assert [p.name for p in paths] == ['comparison.md', 'comparison.csv', 'per_class_recall.csv',
                                     'comparison.png']
  assert paths[3].read_bytes().startswith(b'\x89PNG\r\n\x1a\n')

  rows = {row['method']: row for row in read_csv(tmp_path / 'out' / 'comparison.csv')}
  table = (tmp_path / 'out' / 'comparison.md').read_text()
  for name, names in members.items():
    reports = reports_of(runs[n] for n in names)
    row = rows[name]
    assert int(row['runs']) == len(names)
    assert row['seeds'] == ' '.join(str(r['config']['seed']) for r in reports)
    expected = {
        'accuracy': [r['test']['accuracy'] for r in reports],
        'balanced_accuracy': [r['test']['balanced_accuracy'] for r in reports],
        'macro_f1': [r['test']['macro_f1'] for r in reports],
        'tail_accuracy': [r['test']['groups']['tail']['accuracy'] for r in reports],
        'ece': [r['test']['ece'] for r in reports],
        'quadratic_kappa': [r['test']['quadratic_kappa'] for r in reports],
    }
    cells = []
    for metric, values in expected.items():
      assert float(row[f'{metric}_mean']) == pytest.approx(np.mean(values), rel=1e-12)
      assert int(row[f'{metric}_n']) == len(values)
      if len(values) > 1:
        std = np.std(values, ddof=1)
        assert float(row[f'{metric}_std']) == pytest.approx(std, rel=1e-12)
        cells.append(f'{100 * np.mean(values):.1f} ± {100 * std:.1f}')
      else:
        assert row[f'{metric}_std'] == ''
        cells.append(f'{100 * np.mean(values):.1f} ± —')
    cells.pop()  # quadratic kappa is in the CSV only
    assert f"| {name} | {len(names)} | {' | '.join(cells)} |" in table


def test_per_class_recall_is_the_mean_of_defined_recalls(runs, tmp_path):
  comparison.compare([runs['ce0'], runs['ce1'], runs['supcon0']], tmp_path)
  rows = read_csv(tmp_path / 'per_class_recall.csv')
  assert [row['class'] for row in rows] == fake_runs.CLASS_NAMES
  assert [int(row['train_count']) for row in rows] == fake_runs.TRAIN_COUNTS
  ce = reports_of([runs['ce0'], runs['ce1']])
  for index, row in enumerate(rows):
    recalls = [r['test']['per_class'][index]['recall'] for r in ce]
    defined = [r for r in recalls if r is not None]  # class 5 is absent from ce1's test split
    assert len(defined) == (1 if index == 5 else 2)
    assert float(row['stage1 lambda=0']) == pytest.approx(np.mean(defined))
  # ... and the Markdown section shows the same numbers side by side.
  table = (tmp_path / 'comparison.md').read_text()
  supcon = reports_of([runs['supcon0']])[0]['test']['per_class'][0]['recall']
  assert (f"| nevus | 300 | {100 * float(rows[0]['stage1 lambda=0']):.1f} | "
          f'{100 * supcon:.1f} |') in table


def test_undefined_values_are_left_out_and_counted():
  assert comparison.mean_and_std([0.5, None, 0.7]) == (pytest.approx(0.6),
                                                       pytest.approx(np.std([0.5, 0.7], ddof=1)),
                                                       2)
  assert comparison.mean_and_std([None]) == (None, None, 0)
  assert comparison._cell([0.5, None, 0.7]) == '60.0 ± 14.1 (2/3 runs)'
  assert comparison._cell([None, None]) == '—'


def test_csv_counts_the_runs_behind_each_mean(tmp_path):
  directories = []
  for seed in (0, 1, 2):
    report, _ = fake_runs.fake_report(seed=seed)
    if seed == 1:
      report['test']['quadratic_kappa'] = None  # undefined for this run
    directories.append(fake_runs.write_run(tmp_path / f'seed{seed}', report))
  comparison.compare(directories, tmp_path / 'out')
  (row,) = read_csv(tmp_path / 'out' / 'comparison.csv')
  assert row['runs'] == '3' and row['accuracy_n'] == '3' and row['quadratic_kappa_n'] == '2'
  kappas = [comparison.load_run(d).report['test']['quadratic_kappa'] for d in directories]
  assert float(row['quadratic_kappa_mean']) == pytest.approx(np.mean([kappas[0], kappas[2]]))


def test_a_field_other_than_the_seed_makes_another_method(tmp_path):
  directories = []
  for seed, learning_rate in ((0, 0.05), (1, 0.05), (0, 0.1)):
    report, _ = fake_runs.fake_report(seed=seed, learning_rate=learning_rate,
                                      log_every_steps=10 + seed)  # bookkeeping: ignored
    directories.append(fake_runs.write_run(tmp_path / f'lr{learning_rate}_{seed}', report))
  methods = comparison.group_runs(comparison.load_runs(directories))
  assert [(m.name, len(m.runs)) for m in methods] == [
      ('stage1 lambda=0.5 (learning_rate=0.05)', 2), ('stage1 lambda=0.5 (learning_rate=0.1)', 1)]
  # --group_by merges them again; a field no run has is an error naming the run.
  methods = comparison.group_runs(comparison.load_runs(directories),
                                  ['stage', 'contrastive_weight'])
  assert [(m.name, len(m.runs)) for m in methods] == [
      ('stage=stage1, contrastive_weight=0.5', 3)]
  with pytest.raises(comparison.ComparisonError, match=r"'optimiser' is not in the config of"):
    comparison.group_runs(comparison.load_runs(directories), ['optimiser'])


def test_group_by_a_stage1_field_of_crt_runs(runs):
  crt = comparison.load_runs([runs['crt0']])
  assert crt[0].settings['stage1.contrastive_weight'] == 0.5
  methods = comparison.group_runs(crt, ['stage', 'stage1.contrastive_weight'])
  assert [m.name for m in methods] == ['stage=stage2, stage1.contrastive_weight=0.5']
  # A stage-1 run has no stage-1 parent: the error names it.
  mixed = comparison.load_runs([runs['crt0'], runs['supcon0']])
  with pytest.raises(comparison.ComparisonError, match=f"{runs['supcon0']}; its fields"):
    comparison.group_runs(mixed, ['stage', 'stage1.contrastive_weight'])


def test_crt_lambda_found_relative_to_cwd_or_as_a_sibling(tmp_path, monkeypatch):
  stage1, _ = fake_runs.fake_report(seed=0, contrastive_weight=0.25)
  fake_runs.write_run(tmp_path / 'exp' / 'stage1', stage1)
  for init_from, name in (('exp/stage1', 'relative'), ('/moved/away/stage1', 'sibling')):
    report, _ = fake_runs.fake_report(seed=0, stage='stage2', init_from=init_from)
    fake_runs.write_run(tmp_path / 'exp' / name, report)
  monkeypatch.chdir(tmp_path)
  for name in ('relative', 'sibling'):
    run = comparison.load_run(tmp_path / 'exp' / name)
    assert comparison.method_name(run.settings) == 'stage2 (cRT) lambda=0.25', name
  lost, _ = fake_runs.fake_report(seed=0, stage='stage2', init_from='/nowhere/at/all')
  run = comparison.load_run(fake_runs.write_run(tmp_path / 'lost', lost))
  assert comparison.method_name(run.settings) == 'stage2 (cRT) lambda=?'


def test_crt_lambda_from_the_reports_own_stage1_config(tmp_path):
  # Stage-2 results kept without their stage-1 runs (the large checkpoints left behind):
  # each report's copy of its stage-1 config still tells the methods apart.
  directories = []
  for weight in (0.0, 0.5):
    stage1, _ = fake_runs.fake_report(seed=0, contrastive_weight=weight)
    for seed in (0, 1):
      report, _ = fake_runs.fake_report(seed=seed, stage='stage2', init_from='/gone/stage1')
      report['stage1_config'] = stage1['config']
      directories.append(fake_runs.write_run(tmp_path / f'w{weight}' / f's{seed}', report))
  runs = comparison.load_runs(directories)
  assert [comparison.method_name(run.settings) for run in runs] == (
      ['stage2 (cRT) lambda=0'] * 2 + ['stage2 (cRT) lambda=0.5'] * 2)


def test_crt_lambda_is_not_read_from_a_stage2_runs_own_config(tmp_path):
  # results/stage1/NAME and results/stage2/NAME, moved: the sibling of the stage-2 run
  # named like its stage-1 run is the stage-2 run itself, whose lambda is always 0.
  stage1, _ = fake_runs.fake_report(seed=0, contrastive_weight=0.5)
  fake_runs.write_run(tmp_path / 'results' / 'stage1' / 'run', stage1)
  report, _ = fake_runs.fake_report(seed=0, stage='stage2', init_from='/moved/stage1/run')
  run = comparison.load_run(fake_runs.write_run(tmp_path / 'results' / 'stage2' / 'run', report))
  assert comparison.method_name(run.settings) == 'stage2 (cRT) lambda=?'


def test_different_class_lists_name_both_runs(tmp_path):
  first, _ = fake_runs.fake_report(seed=0)
  other_names = fake_runs.CLASS_NAMES[:-1] + ['angioma']
  second, _ = fake_runs.fake_report(seed=1, class_names=other_names)
  a = fake_runs.write_run(tmp_path / 'a', first)
  b = fake_runs.write_run(tmp_path / 'b', second)
  with pytest.raises(comparison.ComparisonError, match=f'{a} and {b} have different class lists'):
    comparison.load_runs([a, b])


def test_missing_report_and_repeated_directory(tmp_path):
  report, _ = fake_runs.fake_report(seed=0)
  good = fake_runs.write_run(tmp_path / 'good', report)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(comparison.ComparisonError, match=f'{tmp_path / "empty"}: no report.json'):
    comparison.load_runs([good, tmp_path / 'empty'])
  with pytest.raises(comparison.ComparisonError, match='given twice'):
    comparison.load_runs([good, tmp_path / 'good' / '..' / 'good'])
  (tmp_path / 'broken').mkdir()
  (tmp_path / 'broken' / 'report.json').write_text('{"stage": ')
  with pytest.raises(comparison.ComparisonError, match='not valid JSON'):
    comparison.load_run(tmp_path / 'broken')


def test_default_output_is_the_common_parent(runs):
  assert comparison.default_output_dir([runs['supcon0'], runs['supcon1']]) == (
      runs['supcon0'].parent.resolve())
  assert comparison.default_output_dir([runs['supcon0'], runs['ce0']]) == (
      runs['supcon0'].parent.parent.resolve())


def run_command(*args):
  return subprocess.run([sys.executable, '-m', 'imbal_jax.report', *map(str, args)], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)


def test_command_prints_the_table_and_writes_files(runs, tmp_path):
  result = run_command(runs['supcon0'], runs['supcon1'], runs['ce0'], f'--output={tmp_path}/cmp')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0] == ('| method | seeds | accuracy | balanced accuracy | macro-F1 | '
                      'tail accuracy | ECE |')
  assert lines[2].startswith('| stage1 lambda=0.5 | 2 | ')
  assert lines[3].startswith('| stage1 lambda=0 | 1 | ')
  for name in ('comparison.md', 'comparison.csv', 'per_class_recall.csv', 'comparison.png'):
    assert (tmp_path / 'cmp' / name).is_file()


def test_command_errors(runs, tmp_path):
  result = run_command(runs['supcon0'], tmp_path / 'missing')
  assert result.returncode == 2
  assert f'{tmp_path / "missing"}: no report.json' in result.stderr
  result = run_command()
  assert result.returncode != 0 and 'run directories' in result.stderr
  (tmp_path / 'a_file').write_text('kept')
  with pytest.raises(comparison.ComparisonError, match=r'--output=.*a_file is a file; name a '
                     r'directory'):
    comparison.compare([runs['supcon0']], tmp_path / 'a_file')
  assert (tmp_path / 'a_file').read_text() == 'kept'
  with pytest.raises(comparison.ComparisonError, match='cannot write the comparison files to'):
    comparison.compare([runs['supcon0']], tmp_path / 'a_file' / 'below')
