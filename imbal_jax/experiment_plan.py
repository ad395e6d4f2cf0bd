"""The plan of a comparison (imbal_jax.experiment): which runs, where, with which config.

configs/experiments/PRESET.py lists the methods: a name, overrides of
configs/stage1.py:PRESET and, for a two-stage method, overrides of
configs/stage2.py:PRESET. Runs are laid out as

  DIR/runs/<stage-1 key>/seed<S>/stage1         shared by every method with that stage 1
  DIR/runs/<stage-1 key>/seed<S>/<stage-2 key>

where a key lists the config fields that differ from the preset ('preset'
when none do; the stage-2 key starts with 'stage2'), so two methods with the
same stage-1 config share its runs and nothing is trained twice. A plan is
checked whole (methods, overrides, stage-1 configs) before any compute.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import os
import pathlib
import re
import shlex
from typing import Any, Sequence

from imbal_jax import configuration

CONFIGS = configuration.CONFIGS
EXPERIMENTS = CONFIGS / 'experiments'
STAGES = ('stage1', 'stage2')
NAME_PATTERN = re.compile(r'[A-Za-z0-9][A-Za-z0-9+\-._=]*')
_KEY_UNSAFE = re.compile(r'[^A-Za-z0-9+\-._=,]')
# Fields set per run by the experiment itself, never by a method or an override.
_RUN_FIELDS = ('seed', 'init_from', 'stage')


class ExperimentError(ValueError):
  """A bad preset, method or override; the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class Method:
  """One row of the table."""

  name: str
  stage1: dict[str, Any]
  stage2: dict[str, Any] | None  # None: one-stage, its stage-1 run is the result


@dataclasses.dataclass
class Run:
  """One training run; `status` is pending, trained, done_before, failed, blocked or interrupted."""

  stage: str
  seed: int
  directory: pathlib.Path
  config: Any  # ml_collections.ConfigDict
  command: str
  methods: list[str]
  stage1: Run | None = None  # the run a stage-2 run starts from
  status: str = 'pending'
  error: str | None = None
  wall_s: float | None = None
  resumed: bool = False


@dataclasses.dataclass
class Plan:
  """Everything the command will do, built and checked before any training."""

  preset: str
  seeds: list[int]
  workdir: pathlib.Path
  overrides: list[str]
  parsed_overrides: dict[str, dict[str, Any]]
  methods: list[Method]
  unavailable: dict[str, str]  # method name -> why it cannot run with this code
  runs: list[Run]
  results: dict[str, list[Run]]  # method name -> its result run per seed


# The shared table of methods; not a data-set preset itself.
STANDARD = 'standard'


def preset_names() -> list[str]:
  """The data-set presets: the files of configs/experiments other than standard.py."""
  return sorted(path.stem for path in EXPERIMENTS.glob('*.py')
                if path.stem != STANDARD and not path.stem.startswith('_'))


def load_methods(preset: str) -> list[Method]:
  """configs/experiments/PRESET.py's methods, checked for shape and unique names.

  A preset file that defines get_methods() lists its own; one that does not (a
  docstring naming its data set) runs standard.py's standard_methods().
  """
  names = preset_names()
  if preset not in names:
    raise ExperimentError(f'--preset={preset!r} is not known; choose one of {", ".join(names)} '
                          f'(the files in {EXPERIMENTS}, standard.py aside).')
  methods = []
  module = configuration.load_config_file(EXPERIMENTS / f'{preset}.py',
                                          f'imbal_jax_experiment_{preset}')
  if hasattr(module, 'get_methods'):
    entries = module.get_methods()
  else:
    standard = configuration.load_config_file(EXPERIMENTS / f'{STANDARD}.py',
                                              'imbal_jax_experiment_standard')
    entries = standard.standard_methods()
  for entry in entries:
    name = str(entry.get('name', ''))
    if (not NAME_PATTERN.fullmatch(name) or set(entry) != {'name', 'stage1', 'stage2'}
        or not isinstance(entry['stage1'], dict)
        or not isinstance(entry['stage2'], (dict, type(None)))):
      raise ExperimentError(
          f'configs/experiments/{preset}.py: method {entry!r} needs exactly the keys name, '
          'stage1 (a dict), stage2 (a dict or None) and a name of letters, digits and +-._= '
          '(no spaces or commas).')
    if any(name == m.name for m in methods):
      raise ExperimentError(f'configs/experiments/{preset}.py names two methods {name!r}.')
    methods.append(Method(name, dict(entry['stage1']),
                          None if entry['stage2'] is None else dict(entry['stage2'])))
  return methods


def _parse_value(text: str, kind: type, what: str, default: Any = None) -> Any:
  # 'none' is a value of some text fields (augment=none): None only where the field
  # is not text or holds None by default (configuration.resolve refuses None elsewhere).
  if text in ('None', 'none') and (kind is not str or default is None):
    return None
  try:
    if kind is bool:
      return {'true': True, '1': True, 'false': False, '0': False}[text.lower()]
    if kind in (int, float):
      return kind(text)
  except (KeyError, ValueError):
    raise ExperimentError(f'{what}: {text!r} is not a {kind.__name__}.') from None
  return text


def parse_overrides(texts: Sequence[str], bases: dict[str, Any]) -> dict[str, dict[str, Any]]:
  """['num_epochs=5', 'stage2.num_epochs=2'] -> {'stage1': {...}, 'stage2': {...}}.

  A plain FIELD applies to both stages (data and encoder fields only to stage 1:
  stage 2 inherits them; `loss` only to stage 1: stage 2 trains with cross-entropy);
  stage1.FIELD / stage2.FIELD to one.
  """
  parsed = {stage: {} for stage in STAGES}
  for text in texts:
    what = f'--override={text}'
    field, sep, value = text.partition('=')
    stage, dot, bare = field.partition('.')
    one_stage = bool(dot) and stage in STAGES
    stages, field = ((stage,), bare) if one_stage else (STAGES, field)
    if not sep or not field:
      raise ExperimentError(f'{what}: write FIELD=VALUE, e.g. --override=num_epochs=5 '
                            '(stage1.FIELD or stage2.FIELD for one stage).')
    if field in _RUN_FIELDS:
      raise ExperimentError(f'{what}: the experiment sets {field} for every run itself.')
    if not any(field in bases[s] for s in stages):
      close = difflib.get_close_matches(field, list(bases['stage1']) + list(bases['stage2']), 1)
      hint = f'; did you mean {close[0]}?' if close else '; configs/stage1.py lists the fields.'
      raise ExperimentError(f'{what}: {field!r} is not a config field{hint}')
    if field in configuration.INHERITED_FIELDS:  # stage 2 takes them from its stage-1 run
      if stages == ('stage2',):
        raise ExperimentError(f'{what}: stage 2 inherits {field} from stage 1; override it '
                              f'for both with --override={field}={value}.')
      stages = ('stage1',)
    if field == 'loss' and stages == STAGES:  # stage 2 trains its head with cross-entropy
      stages = ('stage1',)
    targets = [s for s in stages if field in bases[s]]
    for s in targets:
      parsed[s][field] = _parse_value(value, bases[s].get_type(field), what, bases[s][field])
  return parsed


def _set_fields(config, values: dict[str, Any], what: str) -> None:
  for field, value in values.items():
    try:
      config[field] = value
    except TypeError as error:
      raise ExperimentError(
          f'{what}: {field}={value!r} does not fit the field ({error}).') from None


def _format_value(value: Any) -> str:
  return repr(value) if isinstance(value, float) else str(value)


def run_key(config, base) -> str:
  """The fields of `config` that differ from `base`, as a directory name."""
  current, reference = config.to_dict(), base.to_dict()
  raw = ','.join(f'{field}={_format_value(current[field])}' for field in sorted(current)
                 if field not in _RUN_FIELDS and current[field] != reference.get(field))
  key = _KEY_UNSAFE.sub('_', raw)[:80]
  if key != raw:  # shortened or unsafe characters: keep it unique
    key += '-' + hashlib.sha1(raw.encode()).hexdigest()[:8]
  return key


def _command(stage: str, preset: str, directory: pathlib.Path, values: dict[str, Any]) -> str:
  args = ['python', '-m', 'imbal_jax.main', f'--config=configs/{stage}.py:{preset}',
          f'--workdir={directory}']
  args += [f'--config.{field}={_format_value(value)}' for field, value in values.items()]
  return shlex.join(args)


def _available(methods: list[Method], bases: dict[str, Any],
               method_names: Sequence[str] | None, preset: str
               ) -> tuple[list[Method], dict[str, str]]:
  """The methods to run, and those left out for a field this code base lacks."""
  unavailable = {}
  for method in methods:
    for stage, values in (('stage1', method.stage1), ('stage2', method.stage2 or {})):
      missing = [field for field in values if field not in bases[stage]]
      if missing:
        unavailable[method.name] = (f'configs/{stage}.py has no field {missing[0]!r} in this '
                                    'version of imbal_jax')
  known = [m.name for m in methods]
  for name in method_names or ():
    if name not in known:
      close = difflib.get_close_matches(name, known, 1)
      raise ExperimentError(
          f'--methods: {name!r} is not a method of configs/experiments/{preset}.py'
          + (f'; did you mean {close[0]}?' if close else f'; choose from {", ".join(known)}.'))
    if name in unavailable:
      raise ExperimentError(f'--methods: {name} cannot run: {unavailable[name]}.')
  chosen = [m for m in methods if m.name not in unavailable
            and (not method_names or m.name in method_names)]
  return chosen, unavailable


def plan_experiment(preset: str, seeds: int, workdir: str | pathlib.Path,
                    method_names: Sequence[str] | None = None,
                    overrides: Sequence[str] = ()) -> Plan:
  """Checks the preset, methods and overrides and lays out the runs; trains nothing."""
  if seeds < 1:
    raise ExperimentError(f'--seeds={seeds}: give the number of seeds, at least 1.')
  methods = load_methods(preset)
  try:
    bases = {stage: configuration.load_config_file(
        CONFIGS / f'{stage}.py', f'imbal_jax_experiment_{stage}').get_config(preset)
             for stage in STAGES}
  except ValueError as error:
    raise ExperimentError(f'--preset={preset}: {error}') from None
  parsed = parse_overrides(overrides, bases)
  # As on imbal_jax.main's command line: the preset's ratio is for its own data set.
  probe = copy.deepcopy(bases['stage1'])
  _set_fields(probe, parsed['stage1'], '--override')
  if configuration.keep_ratio_for_its_data(probe, bases['stage1'].dataset, parsed['stage1']):
    parsed['stage1']['imbalance_ratio'] = None
  methods, unavailable = _available(methods, bases, method_names, preset)
  for method in methods:
    for stage, values in (('stage1', method.stage1), ('stage2', method.stage2 or {})):
      clashing = sorted(set(values) & set(parsed[stage]))
      if clashing:
        raise ExperimentError(f'--override of {stage}.{clashing[0]} conflicts with method '
                              f'{method.name}, which sets it; leave it to the method.')
  workdir = pathlib.Path(workdir)
  runs, results = [], {m.name: [] for m in methods}
  stage1_runs, claimed = {}, {}  # directory -> Run; result directory -> method name
  for seed in range(seeds):
    for method in methods:
      config = copy.deepcopy(bases['stage1'])
      _set_fields(config, method.stage1, f'method {method.name} (stage 1)')
      directory = (workdir / 'runs' / (run_key(config, bases['stage1']) or 'preset') /
                   f'seed{seed}' / 'stage1')
      if directory not in stage1_runs:
        values = {**method.stage1, **parsed['stage1'], 'seed': seed}
        _set_fields(config, values, '--override')
        stage1_runs[directory] = Run('stage1', seed, directory, config,
                                     _command('stage1', preset, directory, values), [])
        runs.append(stage1_runs[directory])
      result = stage1_runs[directory]
      result.methods.append(method.name)
      if method.stage2 is not None:
        config = copy.deepcopy(bases['stage2'])
        _set_fields(config, method.stage2, f'method {method.name} (stage 2)')
        key = run_key(config, bases['stage2'])
        values = {**method.stage2, **parsed['stage2'], 'seed': seed,
                  'init_from': str(directory)}
        _set_fields(config, values, '--override')
        # The absolute path: the experiment may be resumed from another working directory.
        config.init_from = os.path.abspath(directory)
        directory = directory.parent / ('stage2' + (',' + key if key else ''))
        result = Run('stage2', seed, directory, config,
                     _command('stage2', preset, directory, values), [method.name], result)
        runs.append(result)
      if result.directory in claimed:
        raise ExperimentError(f'methods {claimed[result.directory]} and {method.name} are the '
                              f'same runs ({result.directory}); keep one of them.')
      claimed[result.directory] = method.name
      results[method.name].append(result)
  # Every run is checked before any trains; a stage 2 against its planned stage-1 config,
  # since its stage-1 run may not exist yet.
  for run in runs:
    try:
      if run.stage == 'stage1':
        configuration.resolve(run.config)
      else:
        configuration.resolve(run.config, run.stage1.config.to_dict())
    except configuration.ConfigError as error:
      raise ExperimentError(f'{", ".join(run.methods)}'
                            f'{" (stage 2)" if run.stage == "stage2" else ""}: {error}') from None
  return Plan(preset, list(range(seeds)), workdir, list(overrides), parsed, methods,
              unavailable, runs, results)


def overrides_record(plan: Plan) -> dict[str, Any]:
  """The overrides as given on the command line and as applied to each stage."""
  return {'given': plan.overrides, 'applied': plan.parsed_overrides}


def check_workdir(plan: Plan) -> None:
  """Refuses a workdir whose experiment used another preset or other overrides:
  its finished runs would be skipped and mixed into this table."""
  path = plan.workdir / 'experiment.json'
  if not path.is_file():
    return
  saved = json.loads(path.read_text())
  for field, now in (('preset', plan.preset),
                     ('overrides', plan.parsed_overrides)):
    before = saved.get(field)
    before = before['applied'] if field == 'overrides' else before
    if before != now:
      raise ExperimentError(
          f'{plan.workdir} holds an experiment with {field} {before!r}, not {now!r}; use a new '
          f'--workdir, or the same {"--preset" if field == "preset" else "--override flags"}.')


def _status_before(run: Run) -> str:
  if (run.directory / 'report.json').is_file():
    return 'finished'
  if (run.directory / 'checkpoints').is_dir():
    return 'partial: resumes from its checkpoint'
  return 'to train'


def describe(plan: Plan) -> str:
  """The runs, what each is for, and its equivalent imbal_jax.main command."""
  stage1 = sum(run.stage == 'stage1' for run in plan.runs)
  lines = [f'Experiment {plan.preset}: {len(plan.methods)} method(s) x {len(plan.seeds)} seed(s) '
           f'from {len(plan.runs)} runs ({stage1} stage 1, {len(plan.runs) - stage1} stage 2) in '
           f'{plan.workdir}.']
  if plan.overrides:
    lines.append(f'Overrides for every run: {" ".join(plan.overrides)}')
  for name, reason in plan.unavailable.items():
    lines.append(f'Left out: {name} ({reason}).')
  for index, run in enumerate(plan.runs, 1):
    lines += [f'[{index}/{len(plan.runs)}] {run.stage} seed {run.seed} for '
              f'{", ".join(run.methods)}: {_status_before(run)}', f'  {run.command}']
  return '\n'.join(lines)
