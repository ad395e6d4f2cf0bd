"""Compare methods over seeds: python -m imbal_jax.experiment --preset=NAME --seeds=3 --workdir=DIR.

Options: --methods=A,B (default: every method of configs/experiments/NAME.py),
--override=FIELD=VALUE (repeatable; every run, or stage1.FIELD / stage2.FIELD),
--dry_run (list the runs and their `python -m imbal_jax.main` commands).

The runs (laid out by experiment_plan.py, each stage-1 run shared by the
methods that agree on it) are trained in this process, one after the other,
with train.train_and_evaluate. A run with a report.json is skipped, a partial
one resumes from its checkpoint, a failed one is reported while the others go
on (exit status 1 at the end, naming them). After each run DIR/comparison.md,
.csv and .png (mean ± std over seeds, one row per method) and
DIR/experiment.json (preset, seeds, overrides, methods, runs, command line,
machine, wall time per run) are rewritten, so an interrupted experiment still
has a table.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import shlex
import sys
import time
import traceback
from typing import Any, Sequence

from absl import app, flags, logging

from imbal_jax import atomic, comparison, configuration, reporting
from imbal_jax import workdir as workdir_lib
from imbal_jax.experiment_plan import (ExperimentError, Plan, Run, check_workdir, describe,
                                       overrides_record, plan_experiment)

FINISHED = ('trained', 'done_before')


def _check_finished(run: Run) -> None:
  """A finished run must have been trained with this run's config (paths aside)."""
  saved = json.loads((run.directory / 'config.json').read_text())
  expected = configuration.resolve(run.config).to_dict()
  expected['init_from'] = saved.get('init_from', expected['init_from'])
  workdir_lib.check_config(run.directory, expected, force=False,
                           defaults=configuration.default_config(expected['stage']))


def _machine() -> dict[str, Any]:
  import jax
  return {'platform': platform.platform(), 'node': platform.node(),
          'python': platform.python_version(), 'cpu_count': os.cpu_count(),
          'jax': jax.__version__, 'backend': jax.default_backend(),
          'device_kind': jax.devices()[0].device_kind, 'device_count': jax.device_count(),
          'process_count': jax.process_count()}


def _run_record(run: Run) -> dict[str, Any]:
  return {'directory': str(run.directory), 'stage': run.stage, 'seed': run.seed,
          'methods': run.methods, 'status': run.status, 'resumed': run.resumed,
          'wall_s': run.wall_s, 'error': run.error, 'command': run.command,
          'init_from': str(run.stage1.directory) if run.stage1 else None}


def write_outputs(plan: Plan, command_line: str, machine: dict[str, Any]) -> list[pathlib.Path]:
  """DIR/experiment.json, and the comparison of the finished results (if any)."""
  record = {
      'preset': plan.preset, 'seeds': plan.seeds, 'overrides': overrides_record(plan),
      'command_line': command_line, 'machine': machine,
      'methods': [{'name': m.name, 'stage1': m.stage1, 'stage2': m.stage2,
                   'runs': [str(run.directory) for run in plan.results[m.name]]}
                  for m in plan.methods],
      'left_out': plan.unavailable,
      'runs': [_run_record(run) for run in plan.runs],
  }
  plan.workdir.mkdir(parents=True, exist_ok=True)
  reporting.write_json(plan.workdir / 'experiment.json', record)
  finished = {m.name: [run for run in plan.results[m.name] if run.status in FINISHED]
              for m in plan.methods}
  directories = [run.directory for runs in finished.values() for run in runs]
  if not directories:
    return [plan.workdir / 'experiment.json']
  try:
    loaded = dict(zip(directories, comparison.load_runs(directories)))
  except comparison.ComparisonError as error:
    logging.warning('no comparison table: %s', error)
    return [plan.workdir / 'experiment.json']
  methods = [comparison.Method(name, tuple(loaded[run.directory] for run in runs))
             for name, runs in finished.items() if runs]
  written = comparison.write_comparison(methods, plan.workdir)
  # The table's own file says how it was made: shortened runs must not pass for full ones.
  table = plan.workdir / 'comparison.md'
  atomic.write_text(table, table.read_text() + _experiment_note(plan, command_line))
  return [plan.workdir / 'experiment.json'] + written


def _experiment_note(plan: Plan, command_line: str) -> str:
  pending = sum(run.status not in FINISHED for run in plan.runs)
  note = (f'Preset {plan.preset}, seeds {", ".join(map(str, plan.seeds))}; overrides for every '
          f'run: {" ".join(plan.overrides) or "none"}.')
  if pending:
    note += f' {pending} of {len(plan.runs)} runs not finished.'
  if command_line:
    note += f' Command: `{command_line}`.'
  return f'\n## Experiment\n\n{note} Runs, their commands and wall times: experiment.json.\n'


def keep_compiled_programs(workdir: pathlib.Path) -> None:
  """JAX's persistent compilation cache in WORKDIR/jax_cache, unless one is configured.

  Runs of one method on other seeds compile the same programs, but JAX's
  in-memory cache does not carry over from one run to the next.
  """
  import jax
  if jax.config.jax_compilation_cache_dir is None:
    jax.config.update('jax_compilation_cache_dir', str(workdir / 'jax_cache'))


def execute(plan: Plan, command_line: str = '') -> int:
  """Trains the pending runs in order; returns the exit status (0: every run finished)."""
  import jax  # after flag parsing, as in imbal_jax.main
  from imbal_jax import checkpoint, cpu_conv, distributed, host_memory, train
  launcher = distributed.detected_launcher()
  if launcher is not None:
    # Each process would run every run on its own, all writing the same workdir.
    print(f'imbal_jax.experiment: launch error: started as one of several processes (by '
          f'{launcher}); an experiment runs in one process. On several hosts, train each run '
          'with python -m imbal_jax.main (--dry_run lists their commands), then compare them '
          'with python -m imbal_jax.report.', file=sys.stderr)
    return 2
  host_memory.retain_freed_memory()
  try:
    cpu_conv.available()  # IMBAL_JAX_CPU_CONV checked before any run
  except cpu_conv.CpuConvError as error:
    print(f'imbal_jax.experiment: config error: {error}', file=sys.stderr)
    return 2
  distributed.use_cpu_cores([size for run in plan.runs
                             for size in distributed.config_batch_sizes(run.config)],
                            float32=any(run.config.get('dtype', 'float32') == 'float32'
                                        for run in plan.runs))
  keep_compiled_programs(plan.workdir)
  from imbal_jax.data.sources import DataError

  is_writer = jax.process_index() == 0
  machine = _machine()
  saved = plan.workdir / 'experiment.json'
  earlier = {r['directory']: r for r in json.loads(saved.read_text())['runs']} \
      if saved.is_file() else {}

  def save():
    if is_writer:
      write_outputs(plan, command_line, machine)

  for index, run in enumerate(plan.runs, 1):
    title = f'[{index}/{len(plan.runs)}] {run.stage} seed {run.seed} ({", ".join(run.methods)})'
    if run.stage1 is not None and run.stage1.status not in FINISHED:
      run.status, run.error = 'blocked', f'its stage-1 run {run.stage1.directory} did not finish'
      continue
    if (run.directory / 'report.json').is_file():
      try:
        _check_finished(run)
        run.status = 'done_before'
        run.wall_s = earlier.get(str(run.directory), {}).get('wall_s')
      except (ValueError, OSError) as error:  # a config that differs, or unreadable files
        run.status, run.error = 'failed', f'{type(error).__name__}: {error}'
      print(f'{title}: {"finished earlier" if run.status == "done_before" else run.error}')
      continue
    run.resumed = (run.directory / 'checkpoints').is_dir()
    print(f'{title}: {"resuming" if run.resumed else "training"} in {run.directory}', flush=True)
    started = time.perf_counter()
    try:
      train.train_and_evaluate(run.config, str(run.directory))
      run.status = 'trained'
    except (workdir_lib.Preempted, KeyboardInterrupt) as error:
      run.status, run.error = 'interrupted', str(error) or 'interrupted (Ctrl-C)'
      run.wall_s = time.perf_counter() - started
      save()
      print(f'imbal_jax.experiment: {run.error}; rerun the same command to continue.',
            file=sys.stderr)
      return error.exit_code if isinstance(error, workdir_lib.Preempted) else \
          workdir_lib.INTERRUPTED_EXIT_CODE
    except DataError as error:  # every run reads the same data: stop here
      run.status, run.error = 'failed', f'data error: {error}'
      save()
      print(f'imbal_jax.experiment: {run.error}', file=sys.stderr)
      return 2
    except Exception as error:  # one failed run must not stop the others
      expected = (configuration.ConfigError, workdir_lib.WorkdirError, checkpoint.CheckpointError,
                  FloatingPointError)
      if not isinstance(error, expected):
        traceback.print_exc()
      run.status, run.error = 'failed', f'{type(error).__name__}: {error}'
      print(f'{title}: failed: {run.error}', file=sys.stderr)
    run.wall_s = time.perf_counter() - started
    save()
  save()
  failed = [run for run in plan.runs if run.status in ('failed', 'blocked')]
  finished = {m.name for m in plan.methods
              if any(run.status in FINISHED for run in plan.results[m.name])}
  print(f'\nComparison of {len(finished)} method(s) in {plan.workdir / "comparison.md"}; '
        f'runs in {plan.workdir / "experiment.json"}.')
  if failed:
    print(f'{len(failed)} run(s) did not finish:', file=sys.stderr)
    for run in failed:
      print(f'  {run.directory} ({", ".join(run.methods)}): {run.error}', file=sys.stderr)
    return 1
  return 0


def run_command(preset: str, seeds: int, workdir: str, methods: Sequence[str] | None = None,
                overrides: Sequence[str] = (), dry_run: bool = False,
                command_line: str = '') -> int:
  """The command: plan, then describe (dry run) or execute; returns the exit status."""
  try:
    plan = plan_experiment(preset, seeds, workdir, methods, overrides)
    check_workdir(plan)
  except ExperimentError as error:
    print(f'imbal_jax.experiment: config error: {error}', file=sys.stderr)
    return 2
  print(describe(plan), flush=True)
  if dry_run:
    return 0
  return execute(plan, command_line)


def define_flags() -> None:
  # Defined only when run as a command: imbal_jax.main defines --workdir too.
  flags.DEFINE_string('preset', None, 'configs/experiments/PRESET.py, e.g. digits_lt, ham10000.')
  flags.DEFINE_integer('seeds', 3, 'Seeds per method: 0, 1, ..., N-1.')
  flags.DEFINE_string('workdir', None, 'Directory for the runs, the table and experiment.json.')
  flags.DEFINE_list('methods', None, 'Method names to run (default: all the preset lists).')
  flags.DEFINE_multi_string('override', [], 'FIELD=VALUE for every run (stage1.FIELD or '
                            'stage2.FIELD for one stage), e.g. --override=num_epochs=5.')
  flags.DEFINE_bool('dry_run', False, 'List the runs and their commands; train nothing.')
  flags.mark_flags_as_required(['preset', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  FLAGS = flags.FLAGS
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs several INFO lines per save
  sys.exit(run_command(FLAGS.preset, FLAGS.seeds, FLAGS.workdir, FLAGS.methods, FLAGS.override,
                       FLAGS.dry_run, shlex.join([sys.executable, '-m', 'imbal_jax.experiment',
                                                  *sys.argv[1:]])))


if __name__ == '__main__':
  define_flags()
  app.run(main)
