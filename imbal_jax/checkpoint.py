"""Thin wrapper over orbax CheckpointManager.

Two managers per run:
- `checkpoints/`: the latest train states (for resuming), with a small JSON
  of loop bookkeeping (best validation score so far). The position in the
  training data is the state's step: a batch is a pure function of the step
  (data/pipeline.py), so the resumed input pipeline starts there, with any
  number of grain workers (grain's own iterator state depends on the worker
  count, which may change between runs).
- `best/`: the variables of the model selected on the validation split,
  which is what the test split, stage 2 and prediction use.

States are stored as plain nested dicts (flax.serialization state dicts),
so restoring needs no pickled Python objects.
"""

from __future__ import annotations

import errno
import hashlib
import pathlib
from typing import Any

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be read; the message names it and what to do."""


def _unreadable(directory, step, error, others) -> CheckpointError:
  detail = str(error).strip().splitlines()[0][:300] if str(error).strip() else ''
  directory = pathlib.Path(directory)
  if directory.name == 'best':  # the selected model: training again is the only way back
    fallback = (f'train the stage of {directory.parent} again, in a new --workdir or after '
                f'deleting {directory.parent}')
  elif others:
    fallback = (f'delete {directory}/{step} to resume from step {max(others)}, or use a new '
                '--workdir')
  else:
    fallback = (f'delete {directory.parent} to start this stage again, or use a new '
                '--workdir')
  return CheckpointError(
      f'the checkpoint {directory}/{step} cannot be read ({type(error).__name__}: {detail}). '
      f'It is truncated, corrupt or was written by another program: {fallback}.')


def _is_disk_full(error: BaseException) -> bool:
  text = str(error)
  return (isinstance(error, OSError) and error.errno == errno.ENOSPC) or \
      'RESOURCE_EXHAUSTED' in text or 'No space left' in text


def _use_single_replica_writes_on_one_process() -> None:
  """Orbax's default "replica-parallel" saving splits every replicated array among
  its replicas, which on one process only adds a small compiled slice per device
  and parameter (96 of them for a tiny ResNet on 8 CPU devices). It pays off when
  several processes share the writing, so keep it there."""
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=jax.process_count() > 1),
      override=True)


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpoints:

  def __init__(self, workdir: str | pathlib.Path, max_to_keep: int = 2):
    root = pathlib.Path(workdir).absolute()
    self.root = root
    _use_single_replica_writes_on_one_process()
    # Both managers may save the same step at once; with several processes their
    # barriers (named by step) must not collide, hence a prefix each.
    self._latest = ocp.CheckpointManager(
        root / 'checkpoints', options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix='checkpoints')))
    self._best = ocp.CheckpointManager(
        root / 'best', options=ocp.CheckpointManagerOptions(
            max_to_keep=1, multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix='best')))

  @property
  def latest_step(self) -> int | None:
    return self._latest.latest_step()

  @property
  def best_step(self) -> int | None:
    return self._best.latest_step()

  def _guarded(self, action, what: str):
    """Runs a save (or a wait for one); a failure becomes one CheckpointError."""
    try:
      return action()
    except Exception as error:  # orbax re-raises tensorstore errors as ValueError
      # What completed before the failure is kept; resuming starts from there. The
      # manager's own step list also has saves that were started and then failed
      # (their '<step>.orbax-checkpoint-tmp' folders), so read the finished ones from disk.
      complete = _finished_steps(self._latest.directory)
      resume = (f'a rerun resumes from step {max(complete)}, the last complete checkpoint'
                if complete else 'no checkpoint of this run is complete yet')
      cause = 'the disk is full' if _is_disk_full(error) else (
          f'{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}')
      # Saves run in the background: the failure may be an earlier save's, found now.
      raise CheckpointError(f'saving checkpoints in {self.root} failed (found while saving '
                            f'{what}): {cause}. Free space (or '
                            f'choose another --workdir) and rerun: {resume}.') from error

  def save_state(self, step: int, state, bookkeeping: dict[str, Any]) -> None:
    self._guarded(lambda: self._latest.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
        bookkeeping=ocp.args.JsonSave(bookkeeping))), f'the checkpoint of step {step}')

  def restore_state(self, state_like):
    """(state, bookkeeping) at the latest step.

    `state_like` gives the structure and shardings to restore into.
    """
    self._latest.wait_until_finished()
    target = flax.serialization.to_state_dict(state_like)
    step = self._latest.latest_step()
    try:
      restored = self._latest.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_abstract(target)),
          bookkeeping=ocp.args.JsonRestore()))
      return (flax.serialization.from_state_dict(state_like, restored['state']),
              restored['bookkeeping'])
    except Exception as error:  # orbax, tensorstore and JSON errors alike
      # Readable, but not the state this config builds (orbax words it two ways).
      if any(words in str(error) for words in ('structures do not match', 'Structure mismatch')):
        raise CheckpointError(
            f'the checkpoint {self._latest.directory}/{step} holds a train state shaped '
            'otherwise than the one this config builds: a --force rerun changed a field that '
            'shapes it (the model, or the optimizer). Rerun with the values in '
            f'{self.root / "config.json"}, or start the stage in a new --workdir.') from error
      others = [s for s in self._latest.all_steps() if s != step]
      raise _unreadable(self._latest.directory, step, error, others) from error

  def save_best(self, step: int, variables, info: dict[str, Any], replace: bool = False) -> None:
    """Saves the selected model of `step`. A step already saved is kept (re-reached after
    a resume: same step, same values) unless `replace` (a closed-form fit, redone with
    the run's current config)."""
    if step in self._best.all_steps():
      if not replace:
        return
      self._best.wait_until_finished()
      self._best.delete(step)
    saved = self._guarded(lambda: self._best.save(step, args=ocp.args.Composite(
        variables=ocp.args.StandardSave(variables), info=ocp.args.JsonSave(info))),
                          f'the selected model of step {step}')
    if not saved:  # orbax declines a step below the one it holds, without an error
      raise CheckpointError(f'{self._best.directory} holds the selected model of step '
                            f'{max(self._best.all_steps())}, after step {step}; it is not this '
                            'run\'s. Start the stage again in a fresh --workdir.')

  def discard_best_after(self, step: int) -> list[int]:
    """Deletes selected models saved after `step` (the checkpoint a run resumes from).

    They come from the interrupted run's later steps. A resumed run with the same
    config selects them again (its steps repeat bit for bit); with another config
    (--force), they are not this run's, and kept they would shadow its own selections.
    """
    self._best.wait_until_finished()
    later = [s for s in self._best.all_steps() if s > step]
    for later_step in later:
      self._best.delete(later_step)
    return later

  def restore_best(self, variables_like):
    """(variables, info) of the selected model."""
    self._best.wait_until_finished()
    return restore_best(self._best, variables_like)

  def wait(self) -> None:
    self._guarded(self._latest.wait_until_finished, 'the latest checkpoint')
    self._guarded(self._best.wait_until_finished, 'the selected model')

  def close(self) -> None:
    self._latest.close()
    self._best.close()


def variables_sha256(tree) -> str:
  """SHA-256 of a tree of (replicated) arrays: its paths, dtypes, shapes and values.

  Reads each array's first local copy, so it works where an array spans processes.
  """
  digest = hashlib.sha256()
  for path, leaf in sorted(jax.tree.leaves_with_path(tree), key=lambda item: str(item[0])):
    value = np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf)
    digest.update(f'{jax.tree_util.keystr(path)}:{value.dtype.str}:{value.shape};'.encode())
    digest.update(np.ascontiguousarray(value).tobytes())
  return digest.hexdigest()


def _finished_steps(directory) -> list[int]:
  """Steps whose checkpoint folder orbax finalised (renamed from its temporary name)."""
  try:
    return sorted(int(path.name) for path in directory.iterdir() if path.name.isdigit())
  except OSError:
    return []


def restore_best(manager_or_workdir, variables_like):
  """The selected variables of a run (a workdir path or an open manager)."""
  if isinstance(manager_or_workdir, ocp.CheckpointManager):
    manager, owned = manager_or_workdir, False
  else:
    directory = pathlib.Path(manager_or_workdir).absolute() / 'best'
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        create=False))
    owned = True
  try:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f'no selected checkpoint under {manager.directory}')
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          variables=ocp.args.StandardRestore(_abstract(variables_like)),
          info=ocp.args.JsonRestore()))
    except Exception as error:  # orbax, tensorstore and JSON errors alike
      raise _unreadable(manager.directory, step, error, []) from error
    return restored['variables'], restored['info']
  finally:
    if owned:
      manager.close()
