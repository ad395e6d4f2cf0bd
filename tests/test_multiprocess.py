"""Multi-host training checked on one machine: several processes, several device counts.

Two processes on localhost (2 forced CPU devices each, joined by
jax.distributed.initialize over gloo) must train exactly like one process with
4 devices over the same global batch; SIGTERM to one of them must stop both at
the same step; a checkpoint written with 8 devices must resume on 2. The
two-process runs compile everything from scratch (JAX's compilation cache
serves only process 0 on CPU, and imbal_jax.distributed turns it off there),
so they are the slow part of this file.
"""

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import ROOT, mesh_over_first, subprocess_env
from test_configuration import load_config
from test_end_to_end import read_jsonl
from imbal_jax import checkpoint, distributed, train, workdir

# Digits: 477 training images / 64 = 8 steps per epoch; 3 epochs leave room to
# interrupt. ResNet-18 at width 4 is the cheapest model to compile. At the default
# learning rate (0.05) this tiny net amplifies rounding: 4 and 8 devices, which sum
# the batch in different orders, drift apart by 1e-3 within 24 steps; at 0.01 they
# stay within 3e-7 (measured), so the comparisons can be tight.
OVERRIDES = {'model': 'resnet18', 'width': 4, 'num_epochs': 3, 'warmup_epochs': 1,
             'batch_size': 64, 'eval_batch_size': 64, 'log_every_steps': 1,
             'learning_rate': 0.01}
STEPS_PER_EPOCH = 8
TOTAL_STEPS = 3 * STEPS_PER_EPOCH
# A hang (a process waiting for a peer that died) fails the test instead of blocking CI.
# Measured: a two-process launch takes 1 to 2 minutes on a busy 2-core machine.
RUN_TIMEOUT_S = 480


def config_with(**overrides):
  config = load_config('stage1')
  config.update({**OVERRIDES, **overrides})
  return config


def free_port() -> int:
  with socket.socket() as probe:
    probe.bind(('localhost', 0))
    return probe.getsockname()[1]


def start_processes(run_dir, output_dir, num_processes=2, devices_per_process=2):
  """`python -m imbal_jax.main` once per process, as on a cluster; returns the Popens.

  Output goes to files (a full pipe would block a process while the test waits).
  """
  # Every process compiles everything (imbal_jax turns the cache off for multi-process
  # CPU runs); the suite's cheaper code generation (conftest.TEST_XLA_FLAGS) halves
  # that, 82 s instead of about 150 s a launch (measured).
  env = subprocess_env(devices_per_process, cache=False)
  address = f'localhost:{free_port()}'
  overrides = [f'--config.{k}={v}' for k, v in OVERRIDES.items()]
  output_dir.mkdir(parents=True)
  processes = []
  for index in range(num_processes):
    output = (output_dir / f'{index}.out', output_dir / f'{index}.err')
    with open(output[0], 'w') as out, open(output[1], 'w') as err:
      process = subprocess.Popen(
          [sys.executable, '-m', 'imbal_jax.main', '--config=configs/stage1.py',
           f'--workdir={run_dir}', f'--coordinator_address={address}',
           f'--num_processes={num_processes}', f'--process_id={index}', *overrides],
          cwd=ROOT, env=env, stdout=out, stderr=err)
    process.output = output
    processes.append(process)
  return processes


def kill_all(processes, message):
  for process in processes:
    process.kill()
    process.wait()
  last_words = '\n'.join(process.output[1].read_text()[-2000:] for process in processes)
  pytest.fail(f'{message}\n{last_words}')


def finish(processes):
  """(returncode, stdout, stderr) of each process; kills them all on a hang."""
  deadline = time.time() + RUN_TIMEOUT_S
  try:
    for process in processes:
      process.wait(timeout=max(1.0, deadline - time.time()))
  except subprocess.TimeoutExpired:
    kill_all(processes, f'the processes did not finish within {RUN_TIMEOUT_S} s (a hang)')
  return [(process.returncode, process.output[0].read_text(), process.output[1].read_text())
          for process in processes]


def logged_steps(log):
  """Steps in a metrics log being written (a last line may be cut short)."""
  if not log.is_file():
    return []
  return [int(m) for m in re.findall(r'^\{"step": (\d+),', log.read_text(), re.MULTILINE)]


def wait_for_step(processes, log, step):
  deadline = time.time() + RUN_TIMEOUT_S
  while max(logged_steps(log), default=0) < step:
    if any(process.poll() is not None for process in processes):
      kill_all(processes, f'a process ended before step {step}')
    if time.time() > deadline:
      kill_all(processes, f'no step {step} within {RUN_TIMEOUT_S} s')
    time.sleep(0.05)


def losses(run_dir):
  return {r['step']: r['loss'] for r in read_jsonl(run_dir / 'metrics.jsonl')}


@pytest.fixture(scope='module')
def one_process_4_devices(tmp_path_factory):
  """The reference: one process, 4 devices, the same global batches."""
  run_dir = tmp_path_factory.mktemp('reference') / 'run'
  with pytest.MonkeyPatch.context() as monkeypatch:
    mesh_over_first(monkeypatch, 4)
    train.train_and_evaluate(config_with(), str(run_dir))
  return losses(run_dir)


@pytest.fixture(scope='module')
def two_processes(tmp_path_factory):
  """Two processes on localhost; SIGTERM to process 1 alone after step 3.

  One launch: every launch compiles everything in both processes (no cache on
  multi-process CPU), so resuming the pair is left to the single-process tests
  (a resume is the same code whatever the process count).
  """
  root = tmp_path_factory.mktemp('two_processes')
  run_dir = root / 'run'
  processes = start_processes(run_dir, root / 'preempted')
  wait_for_step(processes, run_dir / 'metrics.jsonl', 3)
  processes[1].send_signal(signal.SIGTERM)
  preempted = finish(processes)
  saved = sorted(int(p.name) for p in (run_dir / 'checkpoints').iterdir()
                 if (p / 'commit_success.txt').is_file())
  return run_dir, preempted, losses(run_dir), saved


# Real processes joined by gloo, whose 30 s rendezvous limit is hard-coded: `make test`
# runs these alone, after the parallel part of the suite (see the Makefile).
@pytest.mark.multiprocess
def test_sigterm_on_one_process_stops_both_at_the_same_step(two_processes):
  _, preempted, preempted_losses, saved = two_processes
  steps = []
  for code, _, err in preempted:
    assert code == workdir.PREEMPTED_EXIT_CODE, err[-3000:]
    steps += [int(s) for s in re.findall(r'saved a checkpoint at step (\d+)', err)]
  assert len(steps) == 2 and steps[0] == steps[1], steps
  stopped = steps[0]
  assert 3 < stopped < TOTAL_STEPS
  assert saved[-1] == stopped
  # Process 0 logged every step up to the one both stopped at, each once.
  assert sorted(preempted_losses) == list(range(1, stopped + 1))


@pytest.mark.multiprocess
def test_two_processes_train_like_one_process_with_all_devices(two_processes,
                                                              one_process_4_devices):
  run_dir, preempted, preempted_losses, _ = two_processes
  stopped = max(preempted_losses)
  # Only process 0 writes logs: one record per step, and process 1 prints no progress bar.
  assert [r['step'] for r in read_jsonl(run_dir / 'metrics.jsonl')] == \
      list(range(1, stopped + 1))
  assert 'stage1:' in preempted[0][2] and 'stage1:' not in preempted[1][2]
  assert (run_dir / 'config.json').is_file() and (run_dir / 'data.json').is_file()
  # The same losses as one process over the 4 devices and the same global batches.
  np.testing.assert_allclose([preempted_losses[s] for s in range(1, stopped + 1)],
                             [one_process_4_devices[s] for s in range(1, stopped + 1)], rtol=1e-5)


def test_checkpoint_from_8_devices_resumes_on_2(tmp_path, monkeypatch, capsys):
  config = config_with(num_epochs=2)
  uninterrupted = tmp_path / 'uninterrupted'
  train.train_and_evaluate(config, str(uninterrupted))  # all 8 devices
  # A real SIGTERM right after the first epoch's checkpoint: the loop saves the next
  # step and stops there.
  run_dir = tmp_path / 'resized'
  save_state = checkpoint.Checkpoints.save_state

  def save_then_sigterm(self, step, *args):
    save_state(self, step, *args)
    if step == STEPS_PER_EPOCH:
      os.kill(os.getpid(), signal.SIGTERM)

  with monkeypatch.context() as patch:
    patch.setattr(checkpoint.Checkpoints, 'save_state', save_then_sigterm)
    with pytest.raises(workdir.Preempted) as stopped:
      train.train_and_evaluate(config, str(run_dir))
  saved = STEPS_PER_EPOCH + 1
  assert stopped.value.step == saved
  capsys.readouterr()
  mesh_over_first(monkeypatch, 2)
  train.train_and_evaluate(config, str(run_dir))
  assert f'Resuming stage1 from step {saved}' in capsys.readouterr().out
  resized, reference = losses(run_dir), losses(uninterrupted)
  assert sorted(resized) == sorted(reference) == list(range(1, 2 * STEPS_PER_EPOCH + 1))
  # Up to the interruption: the same 8-device program, bit for bit.
  assert [resized[s] for s in range(1, saved + 1)] == [reference[s] for s in range(1, saved + 1)]
  # After it, 2 devices sum the same global batches in another order (measured:
  # within 2e-7 of the uninterrupted run).
  after = range(saved + 1, 2 * STEPS_PER_EPOCH + 1)
  np.testing.assert_allclose([resized[s] for s in after], [reference[s] for s in after],
                             rtol=1e-5)


@pytest.mark.parametrize('flags,message', [
    ({'process_id': 1}, '--process_id needs --num_processes'),
    ({'num_processes': 2, 'process_id': 2}, r'--process_id=2 must be in 0\.\.1'),
    ({'num_processes': 0}, '--num_processes=0 must be at least 1'),
    ({'num_processes': 2, 'process_id': 0}, '--process_id and --num_processes need '
                                            '--coordinator_address'),
    ({'coordinator_address': 'host:1234', 'num_processes': 1}, 'drop one of them'),
    ({'coordinator_address': 'host'}, 'needs a port'),
])
def test_bad_flag_combinations_are_refused(flags, message, monkeypatch):
  monkeypatch.delenv('JAX_COORDINATOR_ADDRESS', raising=False)
  with pytest.raises(distributed.LaunchError, match=message):
    distributed.initialize(**flags)


@pytest.mark.parametrize('flag,message', [
    ('--process_id=1', '--process_id needs --num_processes (the total number of processes); '
                       'give both, with --coordinator_address, or neither to let the cluster '
                       'launcher set them.'),
    ('--num_processes=2', 'cannot start the multi-process run named by the flags: JAX found '
                          'no cluster (Cloud TPU, SLURM, Open MPI) to fill in what is missing '
                          '(coordinator_address should be defined.); give --coordinator_address, '
                          '--num_processes and --process_id on every process.'),
])
def test_bad_flags_exit_2_with_one_line(flag, message, tmp_path):
  launchers = ('SLURM_', 'OMPI_', 'TPU_', 'MEGASCALE_', 'JAX_COORDINATOR')
  env = {k: v for k, v in os.environ.items() if not k.startswith(launchers)}
  result = subprocess.run(
      [sys.executable, '-m', 'imbal_jax.main', '--config=configs/stage1.py',
       f'--workdir={tmp_path / "run"}', flag],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [f'imbal_jax: launch error: {message}']
  assert not (tmp_path / 'run').exists()


SLURM_STEP = {'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': 'node[1-2]', 'SLURM_PROCID': '0',
              'SLURM_LOCALID': '0'}


@pytest.mark.parametrize('environ,launcher', [
    ({}, None),
    ({**SLURM_STEP, 'SLURM_NTASKS': '1'}, None),
    ({**SLURM_STEP, 'SLURM_NTASKS': '8'}, 'SLURM'),
    ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '8'}, None),  # the batch script, not an srun step
    ({'OMPI_MCA_orte_hnp_uri': 'x', 'OMPI_COMM_WORLD_SIZE': '4'}, 'Open MPI'),
    ({'TPU_WORKER_HOSTNAMES': 'host-0'}, None),
    ({'TPU_WORKER_HOSTNAMES': 'host-0,host-1'}, 'Cloud TPU (GKE)'),
    ({'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234'}, 'JAX_COORDINATOR_ADDRESS'),
])
def test_launchers_are_detected_from_their_variables(environ, launcher):
  assert distributed.detected_launcher(environ) == launcher


def test_flags_fill_in_what_a_cluster_launcher_leaves_out(monkeypatch):
  # Under an srun step JAX finds the coordinator itself: --process_id and
  # --num_processes need no --coordinator_address there (docs/multihost.md).
  for key, value in {**SLURM_STEP, 'SLURM_NTASKS': '16'}.items():
    monkeypatch.setenv(key, value)
  distributed.check_flags(None, 16, 3)
  monkeypatch.delenv('SLURM_NTASKS')
  monkeypatch.delenv('JAX_COORDINATOR_ADDRESS', raising=False)
  with pytest.raises(distributed.LaunchError, match='need --coordinator_address'):
    distributed.check_flags(None, 16, 3)


def test_a_single_process_initialises_nothing(monkeypatch):
  for name in ('JAX_COORDINATOR_ADDRESS', 'SLURM_NTASKS', 'OMPI_MCA_orte_hnp_uri',
               'TPU_WORKER_HOSTNAMES', 'TPU_PROCESS_ADDRESSES', 'MEGASCALE_NUM_SLICES'):
    monkeypatch.delenv(name, raising=False)
  # JAX's backends already run in this test process: a call to
  # jax.distributed.initialize would raise, so returning False shows there was none.
  assert distributed.initialize() is False
  assert distributed.initialize(num_processes=1, process_id=0) is False
  for key, value in {**SLURM_STEP, 'SLURM_NTASKS': '4'}.items():
    monkeypatch.setenv(key, value)
  assert distributed.initialize(num_processes=1) is False  # forced single process
  assert not jax.distributed.is_initialized()


# The launch scripts, run with stand-ins for gcloud, srun and python that record
# their arguments: each must pass `bash -n` and issue the commands it documents.

def run_launcher(tmp_path, script, args, env, stubs):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for name, output in stubs.items():
    (bin_dir / name).write_text(
        '#!/usr/bin/env bash\n'
        'printf "%s\\0" "$(basename "$0")" "$@" >> "$CALLS"; printf "\\n" >> "$CALLS"\n'
        f'{output}\n')
    (bin_dir / name).chmod(0o755)
  calls = tmp_path / 'calls'
  assert subprocess.run(['bash', '-n', script], cwd=ROOT).returncode == 0
  result = subprocess.run(
      ['bash', script, *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
      env={**os.environ, **env, 'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'CALLS': str(calls)})
  assert result.returncode == 0, result.stderr
  return [line.split('\0')[:-1] for line in calls.read_text().splitlines()]


def test_tpu_pod_script_runs_both_stages_on_every_worker(tmp_path):
  calls = run_launcher(
      tmp_path, 'launch/tpu_pod.sh', ['configs/stage1.py:cifar10_lt', '--config.seed=3', '--',
                                      '--config.stage2_method=lws'],
      {'TPU_NAME': 'pod', 'ZONE': 'us-central2-b', 'WORKDIR': '/shared/run',
       'DATA_BUCKET': 'gs://bucket/tfds'},
      {'gcloud': 'if [[ "$*" == *describe* ]]; then echo 4; fi'})
  assert calls[0][:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'describe']
  ssh = [c for c in calls if c[1:5] == ['compute', 'tpus', 'tpu-vm', 'ssh']]
  assert all('--worker=all' in c and c[5] == 'pod' for c in ssh)
  assert any('scp' in c and '--worker=all' in c for c in calls)
  commands = [c[-1].removeprefix('--command=') for c in ssh]
  assert "'jax[tpu]==0.10.2'" in commands[0] and 'gcloud storage rsync' in commands[1]
  # What each worker's shell runs (the data flag is left for it to expand).
  stage1, stage2 = (shlex.split(c.split(' && ')[1]) for c in commands[2:])
  assert stage1 == ['.venv/bin/python', '-m', 'imbal_jax.main',
                    '--config=configs/stage1.py:cifar10_lt', '--workdir=/shared/run/stage1',
                    '--config.seed=3', '--num_processes=4', '--config.data_dir=$HOME/tfds']
  # Stage 2 from the same preset, with the overrides after --.
  assert stage2 == ['.venv/bin/python', '-m', 'imbal_jax.main',
                    '--config=configs/stage2.py:cifar10_lt', '--workdir=/shared/run/stage2',
                    '--config.init_from=/shared/run/stage1', '--config.stage2_method=lws',
                    '--num_processes=4']


def test_slurm_script_runs_one_task_per_gpu(tmp_path):
  script = (ROOT / 'launch' / 'slurm_gpu.sbatch').read_text()
  header = dict(re.findall(r'^#SBATCH --([\w-]+)=(\S+)', script, re.MULTILINE))
  assert header['ntasks-per-node'] == header['gpus-per-node']
  assert header['signal'].startswith('TERM@')
  calls = run_launcher(tmp_path, 'launch/slurm_gpu.sbatch', ['/shared/run', '--config.seed=3'],
                       {'SLURM_SUBMIT_DIR': str(ROOT)}, {'srun': ''})
  assert calls == [
      ['srun', '--kill-on-bad-exit=1', '.venv/bin/python', '-m', 'imbal_jax.main',
       '--config=configs/stage1.py', '--workdir=/shared/run/stage1', '--config.seed=3'],
      ['srun', '--kill-on-bad-exit=1', '.venv/bin/python', '-m', 'imbal_jax.main',
       '--config=configs/stage2.py', '--workdir=/shared/run/stage2',
       '--config.init_from=/shared/run/stage1']]
  (tmp_path / 'again').mkdir()
  calls = run_launcher(tmp_path / 'again', 'launch/slurm_gpu.sbatch',
                       ['/shared/run', '--', '--config.batch_size=96'],
                       {'SLURM_SUBMIT_DIR': str(ROOT), 'CONFIG': 'configs/stage1.py:isic2019'},
                       {'srun': ''})
  assert [c[5:] for c in calls] == [
      ['--config=configs/stage1.py:isic2019', '--workdir=/shared/run/stage1'],
      ['--config=configs/stage2.py:isic2019', '--workdir=/shared/run/stage2',
       '--config.init_from=/shared/run/stage1', '--config.batch_size=96']]


def test_single_host_script_runs_both_stages(tmp_path):
  calls = run_launcher(tmp_path, 'launch/single_host.sh', ['/runs/x', '--config.seed=3'], {},
                       {'python': ''})
  assert calls == [
      ['python', '-m', 'imbal_jax.main', '--config=configs/stage1.py',
       '--workdir=/runs/x/stage1', '--config.seed=3'],
      ['python', '-m', 'imbal_jax.main', '--config=configs/stage2.py',
       '--workdir=/runs/x/stage2', '--config.init_from=/runs/x/stage1']]
  (tmp_path / 'again').mkdir()
  calls = run_launcher(tmp_path / 'again', 'launch/single_host.sh',
                       ['/runs/x', '--config.seed=3', '--', '--config.num_epochs=5'],
                       {'CONFIG': 'configs/stage1.py:ham10000',
                        'STAGE2_CONFIG': 'configs/stage2.py:dermamnist'}, {'python': ''})
  assert [c[3:] for c in calls] == [
      ['--config=configs/stage1.py:ham10000', '--workdir=/runs/x/stage1', '--config.seed=3'],
      ['--config=configs/stage2.py:dermamnist', '--workdir=/runs/x/stage2',
       '--config.init_from=/runs/x/stage1', '--config.num_epochs=5']]
  # Another stage-1 config file: its stage 2 must be named, before anything runs.
  result = subprocess.run(['bash', 'launch/single_host.sh', '/runs/x'], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, 'CONFIG': 'configs/mine.py:fast',
                               'STAGE2_CONFIG': ''})
  assert result.returncode == 2 and 'set STAGE2_CONFIG too' in result.stderr
