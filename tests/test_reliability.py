"""Faults really caused: kill -9, SIGTERM, NaN, corrupt checkpoints, config mix-ups."""

import json
import pathlib
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import ROOT, subprocess_env
from test_configuration import load_config
from test_end_to_end import DEVICES, STEPS_PER_EPOCH, TINY, main_command, read_jsonl, run_main
from imbal_jax import train, workdir

# test_end_to_end's tiny runs (so they share compiled programs): 477 digits / 32 = 15
# steps per epoch, 4 epochs, long enough to interrupt.
OVERRIDES = ('--config.warmup_epochs=1',)


def command(run_dir):
  return main_command('configs/stage1.py', run_dir, *OVERRIDES)


def environment():
  return subprocess_env(DEVICES)


def run_to_end(run_dir):
  return run_main('configs/stage1.py', run_dir, *OVERRIDES)


def start_and_wait_for_checkpoint(run_dir, step):
  process = subprocess.Popen(command(run_dir), cwd=ROOT, env=environment(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  marker = run_dir / 'checkpoints' / str(step) / 'commit_success.txt'
  deadline = time.time() + 300
  while not marker.exists():
    assert process.poll() is None, 'the run ended before it could be interrupted'
    assert time.time() < deadline, 'no checkpoint appeared'
    time.sleep(0.02)
  return process


def final_state(run_dir):
  step = max(int(p.name) for p in (run_dir / 'checkpoints').iterdir() if p.name.isdigit())
  return ocp.StandardCheckpointer().restore((run_dir / 'checkpoints' / str(step) / 'state')
                                            .absolute())


def assert_trees_bitwise_equal(a, b):
  import jax
  leaves_a, leaves_b = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
  assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
  for (path, x), (_, y) in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp('reliability') / 'uninterrupted'
  run_to_end(run_dir)
  return run_dir


def test_kill_9_mid_run_then_rerun_ends_bit_identical(uninterrupted, tmp_path):
  run_dir = tmp_path / 'killed'
  process = start_and_wait_for_checkpoint(run_dir, STEPS_PER_EPOCH)
  process.send_signal(signal.SIGKILL)
  process.wait(timeout=60)
  assert not (run_dir / 'report.json').exists()
  out = run_to_end(run_dir)
  assert 'Resuming stage1 from step' in out.stdout
  assert_trees_bitwise_equal(final_state(run_dir), final_state(uninterrupted))
  # The log has each step once, with the values of the uninterrupted run.
  resumed = read_jsonl(run_dir / 'metrics.jsonl')
  original = read_jsonl(uninterrupted / 'metrics.jsonl')
  assert [r['step'] for r in resumed] == [r['step'] for r in original]
  assert [r['loss'] for r in resumed] == [r['loss'] for r in original]


def test_sigterm_checkpoints_at_next_step_and_rerun_continues(uninterrupted, tmp_path):
  run_dir = tmp_path / 'preempted'
  process = start_and_wait_for_checkpoint(run_dir, STEPS_PER_EPOCH)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == workdir.PREEMPTED_EXIT_CODE, stderr[-2000:]
  assert 'pre-empted (SIGTERM): saved a checkpoint at step' in stderr
  saved = max(int(p.name) for p in (run_dir / 'checkpoints').iterdir() if p.name.isdigit())
  assert saved >= STEPS_PER_EPOCH
  run_to_end(run_dir)
  assert_trees_bitwise_equal(final_state(run_dir), final_state(uninterrupted))


def rerun_with_truncated_arrays(uninterrupted, run_dir, manager, item):
  """Copies the finished run to `run_dir`, truncates the array files of `item` in the last
  step of `manager` ('checkpoints' or 'best') and reruns it: (that step, the result)."""
  shutil.copytree(uninterrupted, run_dir)
  step = max(int(p.name) for p in (run_dir / manager).iterdir() if p.name.isdigit())
  for path in (run_dir / manager / str(step) / item).rglob('*'):
    if path.is_file() and path.parent.name == 'd':
      path.write_bytes(path.read_bytes()[:10])
  return step, subprocess.run(command(run_dir), cwd=ROOT, env=environment(),
                              capture_output=True, text=True, timeout=300)


def test_corrupt_checkpoint_gives_a_clear_error(uninterrupted, tmp_path):
  run_dir = tmp_path / 'corrupt'
  last, result = rerun_with_truncated_arrays(uninterrupted, run_dir, 'checkpoints', 'state')
  assert result.returncode == 2
  assert f'checkpoint error: the checkpoint {run_dir.absolute()}/checkpoints/{last} cannot be read' \
      in result.stderr
  assert f'to resume from step {last - STEPS_PER_EPOCH}' in result.stderr


def test_unreadable_selected_model_says_to_train_the_stage_again(uninterrupted, tmp_path):
  # Rerunning the finished run trains nothing and then reads the selected model.
  run_dir = tmp_path / 'corrupt_best'
  step, result = rerun_with_truncated_arrays(uninterrupted, run_dir, 'best', 'variables')
  assert result.returncode == 2, result.stderr[-3000:]
  run = run_dir.absolute()
  assert f'checkpoint error: the checkpoint {run}/best/{step} cannot be read' in result.stderr
  # Deleting best/ alone would not help: the finished checkpoints would be resumed.
  assert f'train the stage of {run} again, in a new --workdir or after deleting {run}.' \
      in result.stderr


def tiny_config():
  """The config of the command-line runs here (TINY and OVERRIDES), for in-process runs."""
  config = load_config('stage1')
  for override in [*TINY, *OVERRIDES]:
    field, value = override[len('--config.'):].split('=')
    config[field] = type(config[field])(value)
  return config


def test_force_rerun_from_an_earlier_checkpoint_selects_its_own_model(uninterrupted, tmp_path):
  run_dir = tmp_path / 'stale'
  shutil.copytree(uninterrupted, run_dir)
  total = 4 * STEPS_PER_EPOCH
  shutil.rmtree(run_dir / 'checkpoints' / str(total))  # the run resumes from step 45
  # The interrupted run's selected model, saved after that checkpoint: as if it were the
  # last step's, which the rerun reaches again (the case a same-step save would skip).
  [best] = [p for p in (run_dir / 'best').iterdir() if p.name.isdigit()]
  best.rename(run_dir / 'best' / str(total))
  config = tiny_config()
  config.learning_rate *= 2
  report = train.train_and_evaluate(config, str(run_dir), force=True)
  assert report['selection']['step'] == total  # the rerun's only evaluation
  selected = ocp.StandardCheckpointer().restore(
      (run_dir / 'best' / str(total) / 'variables').absolute())
  # This run's last state, not the interrupted run's selected model.
  assert_trees_bitwise_equal(selected['params'], final_state(run_dir)['params'])
  assert report['val']['balanced_accuracy'] == read_jsonl(
      run_dir / 'val_metrics.jsonl')[-1]['val_balanced_accuracy']


def test_workdir_with_other_config_is_refused_then_forced(uninterrupted, tmp_path):
  run_dir = tmp_path / 'other'
  shutil.copytree(uninterrupted, run_dir)
  config = tiny_config()
  config.temperature = 0.2
  with pytest.raises(workdir.WorkdirError, match=r'temperature: 0.1 in the workdir, 0.2 now'):
    train.train_and_evaluate(config, str(run_dir))
  report = train.train_and_evaluate(config, str(run_dir), force=True)
  assert report['config']['temperature'] == 0.2
  # The earlier report was kept, not overwritten.
  kept = json.loads((run_dir / 'report.1.json').read_text())
  assert kept['config']['temperature'] == 0.1


def nan_config():
  config = load_config('stage1')
  config.update(model='resnet18', width=4, num_epochs=1, warmup_epochs=0, batch_size=32, eval_batch_size=64,
                log_every_steps=5, learning_rate=1e30)
  return config


def test_non_finite_loss_stops_with_step_and_terms(tmp_path):
  with pytest.raises(FloatingPointError,
                     match=r'non-finite loss or gradients at step \d+ .*terms at that step: '
                           r'.*loss=nan.*The update was not applied. Last good checkpoint: '
                           r'none yet'):
    train.train_and_evaluate(nan_config(), str(tmp_path / 'nan'))


def test_no_checkpoint_holds_a_refused_update(tmp_path):
  # An early update is refused, and no log step comes before the end of epoch 1: the
  # run must stop there, before saving, not carry the refused update into the epoch-1
  # checkpoint and stop at a later log step (a resume would then skip it unnoticed).
  config = nan_config()
  config.update(num_epochs=2, log_every_steps=1000)
  with pytest.raises(FloatingPointError, match=r'Last good checkpoint: none yet') as error:
    train.train_and_evaluate(config, str(tmp_path / 'nan'))
  first, seen = map(int, re.search(r'at step (\d+) \(seen at step (\d+);',
                                   str(error.value)).groups())
  assert 1 < first < seen < 30  # after step 1's log, seen at the end of epoch 1 of 2
  for kept in ('checkpoints', 'best'):  # neither the training state nor a selected model
    assert not any((tmp_path / 'nan' / kept).glob('*')), kept


def test_skip_nonfinite_skips_and_counts(tmp_path):
  config = nan_config()
  config.skip_nonfinite = True
  train.train_and_evaluate(config, str(tmp_path / 'skip'))
  records = read_jsonl(tmp_path / 'skip' / 'metrics.jsonl')
  assert records[-1]['skipped_nonfinite_steps'] > 0
  state = final_state(tmp_path / 'skip')
  assert int(state['nonfinite_steps']) == records[-1]['skipped_nonfinite_steps']
  import jax
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state['params']))


def test_disk_full_while_saving_keeps_the_last_checkpoint(tmp_path):
  """A real tiny filesystem (tmpfs; needs root, as CI has): fill it during training."""
  mount_point = tmp_path / 'tiny'
  mount_point.mkdir()
  # Room for the first checkpoint and selected model (about 1.8 MB here), not a second one.
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=2400k', 'tmpfs',
                            str(mount_point)], capture_output=True, text=True)
  if mounted.returncode != 0:
    pytest.skip(f'cannot mount a tmpfs here: {mounted.stderr.strip()}')
  try:
    run_dir = mount_point / 'run'
    result = subprocess.run(command(run_dir), cwd=ROOT, env=environment(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-2000:]
    last_line = [l for l in result.stderr.splitlines() if l.startswith('imbal_jax:')][-1]
    assert 'checkpoint error: saving checkpoints in' in last_line
    assert 'the disk is full' in last_line
    assert f'a rerun resumes from step {STEPS_PER_EPOCH}, the last complete checkpoint' in last_line
    # Given room again, the same command resumes from that checkpoint and finishes.
    subprocess.run(['mount', '-o', 'remount,size=64m', str(mount_point)], check=True)
    out = run_to_end(run_dir)
    assert f'Resuming stage1 from step {STEPS_PER_EPOCH}' in out.stdout
    assert (run_dir / 'report.json').is_file()
  finally:
    subprocess.run(['umount', str(mount_point)], capture_output=True)


def test_selected_models_after_the_resumed_step_are_discarded_and_declined_saves_refused(
    tmp_path):
  from imbal_jax import checkpoint
  ckpt = checkpoint.Checkpoints(tmp_path / 'run')
  ckpt.save_best(16, {'w': np.ones(3, np.float32)}, {'step': 16})
  ckpt.wait()
  # orbax declines, without an error, a step below the one best/ holds.
  with pytest.raises(checkpoint.CheckpointError, match=r'holds the selected model of step 16, '
                     r'after step 8'):
    ckpt.save_best(8, {'w': np.zeros(3, np.float32)}, {'step': 8})
  assert ckpt.discard_best_after(16) == []
  assert ckpt.discard_best_after(8) == [16]
  ckpt.save_best(8, {'w': np.zeros(3, np.float32)}, {'step': 8})
  variables, info = ckpt.restore_best({'w': np.ones(3, np.float32)})
  assert info == {'step': 8} and np.asarray(variables['w']).tolist() == [0, 0, 0]
  # A readable checkpoint of another structure (e.g. momentum 0 against > 0) is named as such,
  # not as corrupt.
  ckpt.save_state(4, {'params': np.ones(2, np.float32)}, {'best_step': -1})
  ckpt.wait()
  with pytest.raises(checkpoint.CheckpointError, match=r'checkpoints/4 holds a train state '
                     r'shaped otherwise than the one this config builds'):
    ckpt.restore_state({'params': np.ones(2, np.float32), 'trace': np.ones(2, np.float32)})
  ckpt.close()


def test_force_momentum_between_zero_and_positive_is_refused():
  with pytest.raises(workdir.WorkdirError, match=r'--force cannot change these fields.*\n'
                     r'  momentum: 0.9 in the workdir, 0.0 now'):
    check_forced({'momentum': 0.9}, {'momentum': 0.0})
  check_forced({'momentum': 0.9}, {'momentum': 0.5})  # the same state: allowed


def check_forced(saved, now):
  import tempfile
  import pathlib
  with tempfile.TemporaryDirectory() as tmp:
    (pathlib.Path(tmp) / 'config.json').write_text(json.dumps(saved))
    workdir.check_config(pathlib.Path(tmp), now, force=True)


@pytest.fixture
def python_sigint_handler():
  # A pytest-xdist worker may ignore SIGINT; a command starts with Python's handler.
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  yield
  signal.signal(signal.SIGINT, previous)


def test_ctrl_c_asks_for_a_checkpoint_once_and_a_second_one_stops_at_once(
    capsys, python_sigint_handler):
  import os
  with workdir.StopRequest() as stop:
    assert not stop.reached(1)
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.reached(2) and stop.signal_name == 'SIGINT'
    assert 'Ctrl-C: saving a checkpoint after this step' in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):  # Python's own handler again
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)  # the handler runs between bytecodes; it cannot get past this
  # Left as they were found.
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  error = workdir.Preempted(7, pathlib.Path('/w'), stop.signal_name)
  assert error.exit_code == 130 and str(error).startswith('interrupted (Ctrl-C): saved a '
                                                         'checkpoint at step 7')
  assert workdir.Preempted(7, pathlib.Path('/w')).exit_code == 143
  with workdir.StopRequest() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.reached(1) and stop.signal_name == 'SIGTERM'
  # Started with SIGINT ignored (a script's background job): it stays ignored.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  with workdir.StopRequest() as stop:
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.1)
    assert not stop.reached(1)
  assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
