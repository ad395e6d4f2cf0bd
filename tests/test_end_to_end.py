"""Both stages through `python -m imbal_jax.main`, as a user runs them."""

import json
import shutil
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import ROOT, subprocess_env
from test_reporting import read_scalars

# ResNet-18 at width 4 compiles in half the time of ResNet-32. The same model, batch,
# length and device count as test_reliability's runs: they share compiled programs
# through the persistent cache.
TINY = ['--config.model=resnet18', '--config.width=4', '--config.num_epochs=4',
        '--config.batch_size=32', '--config.eval_batch_size=64', '--config.log_every_steps=5']
STEPS_PER_EPOCH = 15  # 477 digits training images / 32
TOTAL_STEPS = 4 * STEPS_PER_EPOCH
DEVICES = 2


def main_command(config, workdir, *overrides):
  """`python -m imbal_jax.main` with the tiny config (TINY) and `overrides`."""
  return [sys.executable, '-m', 'imbal_jax.main', f'--config={config}', f'--workdir={workdir}',
          *TINY, *overrides]


def run_main(config, workdir, *overrides, num_devices=DEVICES):
  result = subprocess.run(main_command(config, workdir, *overrides), cwd=ROOT,
                          env=subprocess_env(num_devices), capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  return result


def read_jsonl(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def restore_raw(step_dir):
  """A checkpoint item as plain NumPy arrays, without a target structure."""
  return ocp.StandardCheckpointer().restore(step_dir.absolute() / 'variables')


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('runs')
  stage1 = run_main('configs/stage1.py', root / 'stage1', '--config.warmup_epochs=1')
  stage2 = run_main('configs/stage2.py', root / 'stage2', f'--config.init_from={root / "stage1"}',
                    '--config.num_epochs=1')
  return root, stage1, stage2


def test_both_stages_write_reports(runs):
  root, stage1_out, stage2_out = runs
  for stage, out in (('stage1', stage1_out), ('stage2', stage2_out)):
    report = json.loads((root / stage / 'report.json').read_text())
    assert report['stage'] == stage
    assert report['selection']['split'] == 'val'
    for split in ('val', 'test'):
      for key in ('accuracy', 'balanced_accuracy', 'macro_f1', 'per_class'):
        assert key in report[split]
      assert report[split]['num_examples'] == report['split_sizes'][split]
      assert len(report[split]['per_class']) == 10
      assert 0.0 <= report[split]['balanced_accuracy'] <= 1.0
    assert [row['train_count'] for row in report['test']['per_class']] == report['train_counts']
    assert 'balanced_accuracy' in out.stdout and 'report.json' in out.stdout
  # Even a 2-epoch tiny run must make progress on its training loss.
  records = read_jsonl(root / 'stage1' / 'metrics.jsonl')
  assert records[-1]['ce'] < records[0]['ce']


def test_metrics_log_first_step_and_fields(runs):
  root = runs[0]
  records = read_jsonl(root / 'stage1' / 'metrics.jsonl')
  assert records[0]['step'] == 1
  for key in ('step', 'loss', 'ce', 'contrastive', 'learning_rate', 'images_per_sec'):
    assert key in records[0]
  np.testing.assert_allclose(records[0]['loss'],
                             records[0]['ce'] + 0.5 * records[0]['contrastive'], rtol=1e-5)
  steps = [r['step'] for r in records]
  assert steps == sorted(steps) and steps[-1] == TOTAL_STEPS
  stage2 = read_jsonl(root / 'stage2' / 'metrics.jsonl')
  assert stage2[0]['step'] == 1 and 'contrastive' not in stage2[0]


def test_stage2_encoder_is_bit_identical_to_selected_stage1_encoder(runs):
  root = runs[0]
  (stage1_best,) = [p for p in (root / 'stage1' / 'best').iterdir() if p.name.isdigit()]
  (stage2_best,) = [p for p in (root / 'stage2' / 'best').iterdir() if p.name.isdigit()]
  stage1_vars = restore_raw(stage1_best)
  stage2_vars = restore_raw(stage2_best)
  import jax
  leaves1 = jax.tree.leaves_with_path({'params': stage1_vars['params']['encoder'],
                                       'batch_stats': stage1_vars['batch_stats']['encoder']})
  leaves2 = jax.tree.leaves_with_path(stage2_vars['encoder'])
  assert len(leaves1) == len(leaves2) > 0
  for (path1, a), (path2, b) in zip(leaves1, leaves2):
    assert path1 == path2
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert set(stage2_vars['head']['params']) == {'dense'}
  # The report and the stage-2 workdir name that stage-1 model by its weights' hash.
  from imbal_jax import checkpoint
  digest = checkpoint.variables_sha256(stage1_vars)
  assert json.loads((root / 'stage2' / 'report.json').read_text())[
      'stage1_variables_sha256'] == digest
  assert json.loads((root / 'stage2' / 'stage1.json').read_text())[
      'selected_variables_sha256'] == digest


def test_rerun_resumes_from_latest_checkpoint(runs, tmp_path):
  root = runs[0]
  workdir = tmp_path / 'stage1'
  shutil.copytree(root / 'stage1', workdir)
  # Pretend the run died after epoch 3: drop the final checkpoint and the later log lines.
  resume_at = TOTAL_STEPS - STEPS_PER_EPOCH
  shutil.rmtree(workdir / 'checkpoints' / str(TOTAL_STEPS))
  records = [r for r in read_jsonl(workdir / 'metrics.jsonl') if r['step'] <= resume_at]
  (workdir / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
  out = run_main('configs/stage1.py', workdir, '--config.warmup_epochs=1')
  assert f'Resuming stage1 from step {resume_at}' in out.stdout
  resumed = read_jsonl(workdir / 'metrics.jsonl')
  assert [r['step'] for r in resumed if r['step'] > resume_at][0] == resume_at + 5
  assert (workdir / 'checkpoints' / str(TOTAL_STEPS)).is_dir()
  # Same batches, same RNG stream: the resumed run ends where the uninterrupted one did.
  original = {r['step']: r['loss'] for r in read_jsonl(root / 'stage1' / 'metrics.jsonl')}
  after = [r for r in resumed if r['step'] > resume_at]
  np.testing.assert_allclose([r['loss'] for r in after], [original[r['step']] for r in after],
                             rtol=1e-4)
  # TensorBoard shows what metrics.jsonl holds: the points up to the checkpoint (the
  # one at resume_at included) from the first run, the later ones from the resumed run.
  curves = read_scalars(workdir / 'tensorboard')
  assert [step for step, _ in curves['train/loss']] == [r['step'] for r in resumed]
  val_steps = [r['step'] for r in read_jsonl(workdir / 'val_metrics.jsonl')]
  assert resume_at in val_steps
  assert [step for step, _ in curves['val/balanced_accuracy']] == val_steps


def test_one_and_two_devices_log_the_same_first_step_loss(runs, tmp_path):
  # (test_steps compares 1 and 8 devices step by step, in-process.)
  root = runs[0]
  run_main('configs/stage1.py', tmp_path / 'one_device', '--config.warmup_epochs=1',
           '--config.num_epochs=2', num_devices=1)
  one = read_jsonl(tmp_path / 'one_device' / 'metrics.jsonl')[0]
  two = read_jsonl(root / 'stage1' / 'metrics.jsonl')[0]
  assert one['step'] == two['step'] == 1
  np.testing.assert_allclose(one['loss'], two['loss'], atol=1e-4)
  np.testing.assert_allclose(one['contrastive'], two['contrastive'], atol=1e-4)
