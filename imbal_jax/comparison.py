"""Compare finished runs: group them into methods, aggregate the test metrics
over seeds, and write the tables and a chart. `python -m imbal_jax.report`
is the command line over `compare`.

A method is a set of runs whose configs differ only in the seed (and in
fields that cannot change the result, such as how often to log). Its default
name is the stage and the contrastive weight lambda, and for stage 2 its
classifier (e.g. 'stage2 (tau-norm) lambda=0.5'); a stage-2 run takes lambda
from the stage-1 run it was initialised from, since its own config does not
train a contrastive loss.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib
from typing import Any, Sequence

import numpy as np
from absl import logging

from imbal_jax import atomic, plots, reporting

# Fields that differ between seeds of one method (the paths of their stage-1
# runs too), or that cannot change a result ('preset' only labels the settings,
# and runs written before it existed lack it).
NOT_METHOD_FIELDS = frozenset({'seed', 'init_from', 'log_every_steps', 'checkpoint_every_epochs',
                               'eval_batch_size', 'data_workers', 'preset'})
STAGE1_PREFIX = 'stage1.'
STAGE2_METHOD_NAMES = {'crt': 'cRT', 'lws': 'LWS', 'tau_norm': 'tau-norm',
                       'posthoc_la': 'post-hoc LA', 'ncm': 'NCM'}
# Test-split metrics, as (key, column title); all are fractions in [0, 1].
TABLE_METRICS = (('accuracy', 'accuracy'), ('balanced_accuracy', 'balanced accuracy'),
                 ('macro_f1', 'macro-F1'), ('tail_accuracy', 'tail accuracy'), ('ece', 'ECE'))
CSV_METRICS = tuple(key for key, _ in TABLE_METRICS) + (
    'head_accuracy', 'medium_accuracy', 'roc_auc_ovr', 'mcc', 'cohen_kappa', 'quadratic_kappa')
_GROUP_METRICS = {'head_accuracy': 'head', 'medium_accuracy': 'medium', 'tail_accuracy': 'tail'}


class ComparisonError(ValueError):
  """Runs that cannot be compared; the message names the run directories."""


@dataclasses.dataclass(frozen=True)
class Run:
  directory: pathlib.Path
  report: dict[str, Any]
  # The config, flattened; a stage-2 run adds its stage-1 run's as 'stage1.FIELD'.
  settings: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  runs: tuple[Run, ...]

  def values(self, metric: str) -> list[float | None]:
    return [split_metric(run.report, metric) for run in self.runs]


def split_metric(report: dict[str, Any], metric: str, split_name: str = 'test'
                 ) -> float | None:
  """A metric of one split of a report; None if undefined or if the report predates it."""
  split = report[split_name]
  if metric in _GROUP_METRICS:
    return (split.get('groups') or {}).get(_GROUP_METRICS[metric], {}).get('accuracy')
  return split.get(metric)


def mean_and_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
  """Mean and sample std (ddof=1) of the defined values, and how many there were."""
  defined = [v for v in values if v is not None]
  mean = float(np.mean(defined)) if defined else None
  std = float(np.std(defined, ddof=1)) if len(defined) > 1 else None
  return mean, std, len(defined)


def _flatten(config: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in config.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[prefix + key] = value
  return flat


def _stage1_config(directory: pathlib.Path, report: dict[str, Any]) -> dict[str, Any] | None:
  """The config of the stage-1 run that a stage-2 run started from, if it can be found.

  The report's own copy (`stage1_config`, which stage 2 writes) comes first. Reports
  without one are looked up through `init_from`, the path as given at training time:
  absolute, relative to the working directory then, or (runs moved together) a
  sibling of the stage-2 run; a config.json found there counts only if it is a
  stage-1 run's.
  """
  saved = report.get('stage1_config')
  if isinstance(saved, dict):
    return saved
  init_from = report.get('init_from') or report['config'].get('init_from')
  if not init_from:
    return None
  candidates = [pathlib.Path(init_from), directory.parent / pathlib.Path(init_from).name]
  for candidate in candidates:
    config_path = candidate / 'config.json'
    if config_path.is_file():
      try:
        config = json.loads(config_path.read_text())
      except json.JSONDecodeError:
        continue
      if isinstance(config, dict) and config.get('stage') == 'stage1':
        return config
  return None


def load_run(directory: str | pathlib.Path) -> Run:
  directory = pathlib.Path(directory)
  path = directory / 'report.json'
  if not path.is_file():
    raise ComparisonError(f'{directory}: no report.json; name the workdir of a finished run '
                          '(train.py writes report.json at the end).')
  try:
    report = json.loads(path.read_text())
  except json.JSONDecodeError as error:
    raise ComparisonError(f'{path} is not valid JSON ({error}).') from None
  missing = [key for key in ('stage', 'class_names', 'train_counts', 'config', 'test')
             if key not in report]
  if missing:
    raise ComparisonError(f'{path} has no {", ".join(missing)}: not a report written by train.py.')
  settings = _flatten(report['config'])
  if report['stage'] == 'stage2':
    stage1 = _stage1_config(directory, report)
    if stage1 is None:
      logging.warning('%s: its report keeps no stage-1 config and the stage-1 run it started '
                      'from (%s) has no config.json here; its lambda is unknown.', directory,
                      report.get('init_from'))
    else:
      settings.update({STAGE1_PREFIX + k: v for k, v in _flatten(stage1).items()})
  return Run(directory=directory, report=report, settings=settings)


def load_runs(directories: Sequence[str | pathlib.Path]) -> list[Run]:
  """Loads every run; they must be distinct and share the class list."""
  if not directories:
    raise ComparisonError('no run directories given.')
  seen = {}
  for directory in directories:
    resolved = pathlib.Path(directory).resolve()
    if resolved in seen:
      raise ComparisonError(f'{directory} is given twice ({seen[resolved]}).')
    seen[resolved] = directory
  runs = [load_run(directory) for directory in directories]
  first = runs[0]
  for run in runs[1:]:
    if run.report['class_names'] != first.report['class_names']:
      raise ComparisonError(
          f"{first.directory} and {run.directory} have different class lists "
          f"({first.report['class_names']} vs {run.report['class_names']}); only runs on "
          'the same classes can be compared.')
  return runs


def _format_value(value: Any) -> str:
  return f'{value:g}' if isinstance(value, float) else str(value)


def method_name(settings: dict[str, Any]) -> str:
  """'stage1 lambda=0.5', 'stage2 (cRT) lambda=0.5' (stage-2 classifier, lambda of its
  stage-1 run)."""
  stage = settings.get('stage')
  if stage == 'stage1':
    return f"stage1 lambda={_format_value(settings['contrastive_weight'])}"
  if stage == 'stage2':
    weight = settings.get(STAGE1_PREFIX + 'contrastive_weight')
    # Runs from before config.stage2_method existed are cRT.
    method = settings.get('stage2_method', 'crt')
    return (f"stage2 ({STAGE2_METHOD_NAMES.get(method, method)}) "
            f"lambda={'?' if weight is None else _format_value(weight)}")
  return str(stage)


def _is_method_field(field: str) -> bool:
  return field.removeprefix(STAGE1_PREFIX) not in NOT_METHOD_FIELDS


def _default_keys(runs: Sequence[Run]) -> tuple[list[tuple], dict[tuple, str]]:
  keys = [tuple(sorted((field, json.dumps(value, sort_keys=True))
                       for field, value in run.settings.items() if _is_method_field(field)))
          for run in runs]
  names = {key: method_name(run.settings) for key, run in zip(keys, runs)}
  keys_by_name = collections.defaultdict(list)
  for key, name in names.items():
    keys_by_name[name].append(key)
  # Different settings under one derived name: name the fields that tell them apart.
  for name, clashing in keys_by_name.items():
    if len(clashing) < 2:
      continue
    as_dicts = [dict(key) for key in clashing]
    fields = sorted({field for d in as_dicts for field in d
                     if len({d.get(field) for d in as_dicts}) > 1})
    for key, values in zip(clashing, as_dicts):
      shown = ', '.join(f'{field}={_format_value(json.loads(values[field]))}'
                        if field in values else f'{field} unset' for field in fields)
      names[key] = f'{name} ({shown})'
  return keys, names


def _group_by_keys(runs: Sequence[Run], group_by: Sequence[str]) -> tuple[list[tuple], dict]:
  for run in runs:
    missing = [field for field in group_by if field not in run.settings]
    if missing:
      raise ComparisonError(f'--group_by field {missing[0]!r} is not in the config of '
                            f'{run.directory}; its fields: {", ".join(sorted(run.settings))}.')
  keys = [tuple(json.dumps(run.settings[field], sort_keys=True) for field in group_by)
          for run in runs]
  names = {key: ', '.join(f'{field}={_format_value(json.loads(value))}'
                          for field, value in zip(group_by, key)) for key in keys}
  return keys, names


def group_runs(runs: Sequence[Run], group_by: Sequence[str] | None = None) -> list[Method]:
  """Methods in the order of their first run.

  By default runs whose configs differ only in NOT_METHOD_FIELDS form one
  method; with `group_by` (config fields, 'stage1.FIELD' for a stage-2 run's
  stage-1 settings), runs that agree on those fields do.
  """
  keys, names = _group_by_keys(runs, group_by) if group_by else _default_keys(runs)
  grouped = collections.defaultdict(list)
  for key, run in zip(keys, runs):
    grouped[key].append(run)
  methods = [Method(names[key], tuple(members)) for key, members in grouped.items()]
  for method in methods:
    seeds = [run.settings.get('seed') for run in method.runs]
    repeated = sorted({s for s in seeds if seeds.count(s) > 1}, key=str)
    if repeated:
      logging.warning('method %r has several runs with seed %s: they count as separate seeds.',
                      method.name, ', '.join(map(str, repeated)))
  return methods


def _cell(values: Sequence[float | None]) -> str:
  mean, std, count = mean_and_std(values)
  if mean is None:
    return '—'
  cell = f"{100 * mean:.1f} ± {'—' if std is None else f'{100 * std:.1f}'}"
  return cell if count == len(values) else f'{cell} ({count}/{len(values)} runs)'


def _markdown_row(cells: Sequence[Any]) -> str:
  return '| ' + ' | '.join(str(cell).replace('|', r'\|') for cell in cells) + ' |'


def format_table(methods: Sequence[Method]) -> str:
  """The Markdown summary table: one row per method, test metrics in %."""
  lines = [_markdown_row(['method', 'seeds'] + [title for _, title in TABLE_METRICS]),
           '|' + '---|' + '---:|' * (1 + len(TABLE_METRICS))]
  for method in methods:
    lines.append(_markdown_row([method.name, len(method.runs)] +
                               [_cell(method.values(key)) for key, _ in TABLE_METRICS]))
  return '\n'.join(lines)


def _class_train_counts(runs: Sequence[Run]) -> list[int | None]:
  """Each class's training count; None where the runs disagree (other imbalance ratios)."""
  columns = zip(*(run.report['train_counts'] for run in runs))
  return [column[0] if len(set(column)) == 1 else None for column in columns]


def _mean_recalls(method: Method, index: int) -> float | None:
  return mean_and_std([run.report['test']['per_class'][index]['recall']
                       for run in method.runs])[0]


def format_markdown(methods: Sequence[Method]) -> str:
  runs = [run for method in methods for run in method.runs]
  rules = sorted({str(run.report['test'].get('group_rule', 'unknown')) for run in runs})
  class_names = runs[0].report['class_names']
  train_counts = _class_train_counts(runs)
  lines = ['# Comparison on the test split', '',
           'Mean ± sample standard deviation (ddof=1) over seeds, in %; "—" marks a single '
           'seed (no spread) or an undefined value. Tail accuracy: mean recall over the '
           f"tail group's classes ({'; '.join(rules)} of the training counts). ECE: 15 "
           'equal-width confidence bins.', '', format_table(methods), '',
           '## Per-class test recall (%), mean over seeds', '',
           _markdown_row(['class', 'train n'] + [method.name for method in methods]),
           '|---|' + '---:|' * (1 + len(methods))]
  for index, name in enumerate(class_names):
    recalls = [_mean_recalls(method, index) for method in methods]
    lines.append(_markdown_row(
        [name, 'varies' if train_counts[index] is None else train_counts[index]] +
        ['—' if r is None else f'{100 * r:.1f}' for r in recalls]))
  lines += ['', '## Runs', '']
  for method in methods:
    listed = ', '.join(f"{run.directory} (seed {run.settings.get('seed')})"
                       for run in method.runs)
    lines.append(f'- {method.name}: {listed}')
  return '\n'.join(lines) + '\n'


def write_comparison(methods: Sequence[Method], output_dir: str | pathlib.Path
                     ) -> list[pathlib.Path]:
  """comparison.md, comparison.csv, per_class_recall.csv and comparison.png."""
  output_dir = pathlib.Path(output_dir)
  # {metric}_n: how many runs the mean and std are over (a metric can be undefined
  # for a run, e.g. a ROC AUC without negatives; such a run is left out of them).
  summary_header = ['method', 'runs', 'seeds'] + [
      f'{metric}_{stat}' for metric in CSV_METRICS for stat in ('mean', 'std', 'n')]
  summary_rows = []
  for method in methods:
    row = {'method': method.name, 'runs': len(method.runs),
           'seeds': ' '.join(str(run.settings.get('seed')) for run in method.runs)}
    for metric in CSV_METRICS:
      row[f'{metric}_mean'], row[f'{metric}_std'], row[f'{metric}_n'] = mean_and_std(
          method.values(metric))
    summary_rows.append(row)
  runs = [run for method in methods for run in method.runs]
  train_counts = _class_train_counts(runs)
  recall_header = ['class', 'train_count'] + [method.name for method in methods]
  recall_rows = [{'class': name, 'train_count': train_counts[index],
                  **{method.name: _mean_recalls(method, index) for method in methods}}
                 for index, name in enumerate(runs[0].report['class_names'])]
  balanced = [mean_and_std(method.values('balanced_accuracy')) for method in methods]
  return [
      atomic.write_text(output_dir / 'comparison.md', format_markdown(methods)),
      reporting.write_csv(output_dir / 'comparison.csv', summary_header, summary_rows),
      reporting.write_csv(output_dir / 'per_class_recall.csv', recall_header, recall_rows),
      plots.method_bar_chart(
          [method.name for method in methods], [mean for mean, _, _ in balanced],
          [std for _, std, _ in balanced], output_dir / 'comparison.png',
          per_run=[[v for v in method.values('balanced_accuracy') if v is not None]
                   for method in methods]),
  ]


def default_output_dir(run_dirs: Sequence[str | pathlib.Path]) -> pathlib.Path:
  """The deepest directory holding every run directory."""
  parents = [str(pathlib.Path(d).resolve().parent) for d in run_dirs]
  return pathlib.Path(os.path.commonpath(parents))


def compare(run_dirs: Sequence[str | pathlib.Path], output_dir: str | pathlib.Path | None = None,
            group_by: Sequence[str] | None = None) -> tuple[list[Method], list[pathlib.Path]]:
  """Loads the runs, groups them into methods and writes the comparison files."""
  if output_dir and pathlib.Path(output_dir).exists() and not pathlib.Path(output_dir).is_dir():
    raise ComparisonError(f'--output={output_dir} is a file; name a directory for the '
                          'comparison files (it is created if missing).')
  methods = group_runs(load_runs(run_dirs), group_by)
  output_dir = pathlib.Path(output_dir) if output_dir else default_output_dir(run_dirs)
  try:
    return methods, write_comparison(methods, output_dir)
  except OSError as error:
    raise ComparisonError(f'cannot write the comparison files to {output_dir} '
                          f'({error.strerror or error}); name a directory you can write to '
                          'with --output.') from None
