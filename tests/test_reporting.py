"""report.json, the printed report and the TensorBoard curves."""

import itertools
import json
import os
import stat
import time

import pytest
from tensorboard.backend.event_processing import event_accumulator

import fake_runs
from imbal_jax import atomic, reporting


def read_scalars(logdir):
  """Every scalar curve in `logdir`, read by TensorBoard's own loader."""
  accumulator = event_accumulator.EventAccumulator(str(logdir), size_guidance={'scalars': 0})
  accumulator.Reload()
  return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
          for tag in accumulator.Tags()['scalars']}


def test_scalar_writer_round_trip(tmp_path):
  with reporting.ScalarWriter(tmp_path / 'tb') as writer:
    writer.write(1, {'train/loss': 2.5, 'train/learning_rate': 0.1})
    writer.write(20, {'train/loss': 1.25, 'train/learning_rate': 0.05})
    writer.write(40, {'val/balanced_accuracy': 0.75})
  assert read_scalars(tmp_path / 'tb') == {
      'train/loss': [(1, 2.5), (20, 1.25)],
      'train/learning_rate': [(1, pytest.approx(0.1)), (20, pytest.approx(0.05))],
      'val/balanced_accuracy': [(40, 0.75)],
  }


def test_scalar_writer_flushes_at_each_write(tmp_path):
  writer = reporting.ScalarWriter(tmp_path)
  writer.write(5, {'loss': 3.0})
  assert read_scalars(tmp_path) == {'loss': [(5, 3.0)]}  # before close(): a crash keeps it
  writer.close()


def test_resumed_run_purges_the_steps_it_redoes(tmp_path):
  with reporting.ScalarWriter(tmp_path) as writer:
    for step in (10, 20, 30):
      writer.write(step, {'loss': float(step)})
  # Resumed from the checkpoint at step 20, writing from step 21 (train.py passes 21):
  # the old point at 30 must not show, the one at 20 stays.
  with reporting.ScalarWriter(tmp_path, purge_step=21) as writer:
    for step in (30, 40):
      writer.write(step, {'loss': step + 0.5})
  assert len(list(tmp_path.iterdir())) == 2  # two event files, neither overwritten
  assert read_scalars(tmp_path) == {'loss': [(10, 10.0), (20, 20.0), (30, 30.5), (40, 40.5)]}


def test_resumed_run_purges_after_the_tenth_writer_of_a_process(tmp_path, monkeypatch):
  # Writers 9 and 10 of one process within one second: their files must sort in order.
  monkeypatch.setattr(reporting, '_WRITER_IDS', itertools.count(9))
  monkeypatch.setattr(time, 'time', lambda: 1_700_000_000.0)
  with reporting.ScalarWriter(tmp_path) as writer:
    for step in (10, 20, 30):
      writer.write(step, {'loss': float(step)})
  with reporting.ScalarWriter(tmp_path, purge_step=20) as writer:
    for step in (20, 30, 40):
      writer.write(step, {'loss': step + 0.5})
  assert read_scalars(tmp_path) == {'loss': [(10, 10.0), (20, 20.5), (30, 30.5), (40, 40.5)]}


def test_write_json_is_atomic_and_leaves_nothing_behind(tmp_path):
  path = tmp_path / 'deep' / 'report.json'
  reporting.write_json(path, {'a': [1, None]})
  with pytest.raises(TypeError):
    reporting.write_json(path, {'a': object()})  # fails half-way: the old file stays whole
  assert json.loads(path.read_text()) == {'a': [1, None]}
  assert [p.name for p in path.parent.iterdir()] == ['report.json']


def test_format_report_prints_every_metric_and_dashes_for_undefined():
  report, _ = fake_runs.fake_report(seed=0, test_absent=(5,))
  text = reporting.format_report(report)
  for label in ('balanced_accuracy', 'macro_f1', 'tail accuracy', 'roc_auc_ovr', 'ece',
                'mcc', 'quadratic_kappa'):
    assert label in text
  test_ece = f"{100 * report['test']['ece']:5.1f}"
  assert any(line.startswith('ece') and line.endswith(test_ece) for line in text.splitlines())
  vascular = [line for line in text.splitlines() if line.strip().startswith('vascular')]
  assert vascular and vascular[0].endswith('—')  # absent from test: recall undefined


def test_format_report_of_an_older_report():
  report, _ = fake_runs.fake_report(seed=0)
  for split in ('val', 'test'):
    report[split] = {k: report[split][k] for k in ('num_examples', 'accuracy',
                                                   'balanced_accuracy', 'macro_f1',
                                                   'per_class', 'confusion_matrix')}
  text = reporting.format_report(report)
  assert 'balanced_accuracy' in text and 'ece' not in text and 'tail' not in text


def test_scalar_writer_close_twice(tmp_path):
  writer = reporting.ScalarWriter(tmp_path)
  writer.close()
  writer.close()


def test_atomic_write_gives_the_usual_file_mode(tmp_path):
  # Not the private 0600 of a temporary file: what a plain open() gives under this umask.
  plain = tmp_path / 'plain'
  plain.write_text('x')
  path = atomic.write_text(tmp_path / 'atomic', 'x')
  assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_atomic_write_that_fails_cleans_up(tmp_path, monkeypatch):
  path = atomic.write_text(tmp_path / 'a.txt', 'old')

  def broken_replace(source, target):
    raise OSError('disk full')

  monkeypatch.setattr(os, 'replace', broken_replace)
  with pytest.raises(OSError, match='disk full'):
    atomic.write_text(path, 'new')
  assert path.read_text() == 'old'
  assert [p.name for p in tmp_path.iterdir()] == ['a.txt']


def test_format_report_names_a_closed_form_fit_instead_of_a_step():
  report, _ = fake_runs.fake_report(seed=0)
  first = reporting.format_report(report).splitlines()[0]
  assert 'model selected on val' in first and 'at step' in first
  report['stage2'] = {'method': 'tau_norm', 'tau': 1.3, 'val_scores': {}}
  report['selection'] = {'step': 0, 'epoch': 0, 'split': 'val', 'metric': 'balanced_accuracy',
                         'score': 0.5}
  first = reporting.format_report(report).splitlines()[0]
  assert first.endswith(': tau_norm with tau=1.3, chosen on val balanced_accuracy')
  report['stage2'] = {'method': 'ncm', 'scale': 16.0}
  first = reporting.format_report(report).splitlines()[0]
  assert first.endswith(': ncm (scale 16), fitted on the training features')
