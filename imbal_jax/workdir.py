"""What a rerun does with the run directory it finds.

- A workdir that holds a run with a different config is refused (with the
  differing fields) unless the user forces it.
- On resume, log lines written after the restored checkpoint (by the run that
  was interrupted) are dropped: the resumed run writes them again, identically.
- A report about to be replaced is kept as report.N.json.
- SIGTERM (a pre-emption notice) asks the loop to checkpoint at the next step
  boundary and stop; with several processes, every process at the same step.
"""

from __future__ import annotations

import json
import pathlib
import signal
import sys
import threading

import jax
from jax.experimental import multihost_utils

from imbal_jax import atomic

# Fields that change neither the data nor the training trajectory (eval_batch_size
# does where stage 2 caches augmented feature views: check_config).
HARMLESS_FIELDS = {'preset', 'log_every_steps', 'eval_batch_size', 'data_workers',
                   'checkpoint_every_epochs', 'eval_every_epochs'}
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what schedulers expect from a terminated job
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT (Ctrl-C)


# Fields whose change --force allows only where it keeps the shape of the saved train
# state: SGD without momentum keeps no momentum buffer, so 0 against > 0 cannot resume.
STRUCTURAL_FIELDS = {'momentum': lambda value: bool(value)}


def _same_structure(field: str, old, new) -> bool:
  kind = STRUCTURAL_FIELDS[field]
  return old is None or new is None or kind(old) == kind(new)


class WorkdirError(ValueError):
  """The workdir holds something this run must not overwrite or mix with."""


class Preempted(Exception):
  """SIGTERM (or, in one process, Ctrl-C) arrived; a checkpoint was saved at `step`."""

  def __init__(self, step: int, workdir: pathlib.Path, signal_name: str = 'SIGTERM'):
    what = 'pre-empted (SIGTERM)' if signal_name == 'SIGTERM' else 'interrupted (Ctrl-C)'
    super().__init__(f'{what}: saved a checkpoint at step {step} in '
                     f'{workdir / "checkpoints"}; rerun the same command to continue.')
    self.step = step
    # What a shell expects of a process the signal stopped: 128 + its number.
    self.exit_code = PREEMPTED_EXIT_CODE if signal_name == 'SIGTERM' else INTERRUPTED_EXIT_CODE


STAGE1_RECORD = 'stage1.json'


def check_stage1_unchanged(workdir: pathlib.Path, stage1_dir: pathlib.Path,
                           selected: dict) -> dict:
  """Refuses to continue a stage-2 run whose stage-1 run has selected another model since.

  `selected` is the stage-1 model's step, score and variables' SHA-256 now; the
  stage-2 workdir keeps what they were when it started (STAGE1_RECORD). A stage 1
  trained again can select the same step with the same score, so the variables
  decide; records written before the hash was kept compare step and score. Returns
  the record to keep.
  """
  record = {'init_from': str(stage1_dir), 'selected_step': selected.get('step'),
            'selected_score': selected.get('score'),
            'selected_variables_sha256': selected.get('variables_sha256')}
  path = workdir / STAGE1_RECORD
  if path.is_file():
    saved = json.loads(path.read_text())
    fields = ['selected_step', 'selected_score']
    if saved.get('selected_variables_sha256'):
      fields.append('selected_variables_sha256')
    if any(saved.get(field) != record[field] for field in fields):
      same_selection = all(saved.get(f) == record[f] for f in fields[:2])
      what = (f'its selected model (step {record["selected_step"]}) holds other weights than '
              'when this run started' if same_selection else
              f'its selected model was step {saved.get("selected_step")} (score '
              f'{saved.get("selected_score")}), now step {record["selected_step"]} (score '
              f'{record["selected_score"]})')
      raise WorkdirError(
          f'the stage-1 run {stage1_dir} changed since the stage-2 run in {workdir} started: '
          f"{what}. That run's head was trained on the old encoder; start stage 2 in a "
          'fresh --workdir.')
  return record


def check_usable(workdir: pathlib.Path) -> None:
  """Refuses a --workdir that is a file or lies below one, before any work is done."""
  for path in (workdir, *workdir.parents):
    if path.exists():
      if not path.is_dir():
        raise WorkdirError(f'--workdir={workdir}: {path} is a file, not a directory; name a '
                           'directory for the run (it is created if missing).')
      return


def check_config(workdir: pathlib.Path, config: dict, force: bool,
                 defaults: dict | None = None, fixed: tuple[str, ...] = ()) -> None:
  """Refuses a workdir whose saved config differs from `config` in a field that matters.

  A field the saved config lacks (a run written before the field existed)
  agrees when `config` holds its value in `defaults`: a new field's default
  keeps what earlier versions did. `--force` continues the run with the new
  config, except for the `fixed` fields: the saved splits and checkpoints were
  made with their old values, so a run cannot change them.
  """
  saved_path = workdir / 'config.json'
  if not saved_path.is_file():
    return
  saved = json.loads(saved_path.read_text())
  defaults = defaults or {}
  harmless = set(HARMLESS_FIELDS)
  if config.get('cache_features') and (config.get('feature_views') or 1) > 1:
    # The augmented views of the feature cache are drawn batch by batch of eval_batch_size.
    harmless.discard('eval_batch_size')
  keys = (set(saved) | set(config)) - harmless
  differing = {k: (saved.get(k), config.get(k)) for k in sorted(keys)
               if saved.get(k) != config.get(k)
               and not (k not in saved and k in defaults and config.get(k) == defaults[k])}
  if not differing:
    return
  def listed(fields):
    return '\n'.join(f'  {k}: {old!r} in the workdir, {new!r} now'
                     for k, (old, new) in fields.items())

  stuck = {k: v for k, v in differing.items()
            if k in fixed or (k in STRUCTURAL_FIELDS and not _same_structure(k, *v))}
  if force and stuck:
    raise WorkdirError(
        f'{workdir} holds a run with a different config, and --force cannot change these '
        f'fields, which its saved splits or checkpoints were made with:\n{listed(stuck)}\n'
        'Start a fresh --workdir for them.')
  if force:
    return
  lines = listed(differing)
  raise WorkdirError(
      f'{workdir} holds a run with a different config:\n{lines}\n'
      'Use a new --workdir to start fresh, or pass --force to continue this run with the new '
      'config (its checkpoints and logs are kept).')


def truncate_log(path: pathlib.Path, last_step: int) -> None:
  """Keeps the records of a JSON-lines log up to `last_step` (atomically)."""
  if not path.is_file():
    return
  kept = []
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue  # a line cut short by a kill
    if record.get('step', 0) <= last_step:
      kept.append(line)
  atomic.write_text(path, ''.join(line + '\n' for line in kept))


def keep_previous(path: pathlib.Path) -> pathlib.Path | None:
  """Renames an existing file NAME.EXT to NAME.N.EXT (first free N); returns the new path."""
  if not path.is_file():
    return None
  index = 1
  while path.with_name(f'{path.stem}.{index}{path.suffix}').exists():
    index += 1
  return path.rename(path.with_name(f'{path.stem}.{index}{path.suffix}'))


def keep_previous_report(workdir: pathlib.Path) -> pathlib.Path | None:
  """Renames an existing report.json to report.N.json (first free N)."""
  return keep_previous(workdir / 'report.json')


class StopRequest:
  """SIGTERM asks the training loop to stop; `reached(step)` says at which step.

  One process: a signal handler sets a flag, and the loop stops after the step
  in progress. Several processes must stop at the same step (each saves its part
  of the checkpoint, and one that stopped alone would leave the others waiting in
  a collective). There JAX's pre-emption service, started by
  jax.distributed.initialize, catches SIGTERM on any host, and the hosts agree on
  a step: one past the furthest any of them has reached. Asking it is a local
  check until a notice arrives, so the loop asks after every step without a
  device sync.
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous = {}
    self._collective = False
    self.signal_name = 'SIGTERM'  # the signal that asked, once one has

  def __enter__(self) -> 'StopRequest':
    self._collective = jax.process_count() > 1 and jax.distributed.is_initialized()
    if not self._collective and threading.current_thread() is threading.main_thread():
      self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)
      # Ctrl-C too, in one process: a person at a terminal presses it. A second Ctrl-C
      # gets the handler from before (Python's KeyboardInterrupt): it stops at once.
      # Only over Python's own handler: a process started with SIGINT ignored (a
      # background job of a script) keeps ignoring it.
      if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)
    return self

  def _on_sigterm(self, *_) -> None:
    self.signal_name = 'SIGTERM'
    self._event.set()

  def _on_sigint(self, *_) -> None:
    if not self._event.is_set():
      self.signal_name = 'SIGINT'
    self._event.set()
    signal.signal(signal.SIGINT, self._previous[signal.SIGINT])
    print('\nCtrl-C: saving a checkpoint after this step (Ctrl-C again stops at once, '
          'without it).', file=sys.stderr, flush=True)

  def __exit__(self, *exc_info) -> None:
    for number, previous in self._previous.items():
      signal.signal(number, previous)
    self._previous = {}

  def reached(self, step: int) -> bool:
    """Whether to checkpoint and stop after `step`; call it once after every step, in order."""
    if self._collective:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._event.is_set()
