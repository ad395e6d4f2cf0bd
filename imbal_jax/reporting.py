"""Run outputs: metrics.jsonl, TensorBoard curves, report.json, per_class.csv,
the pictures and the printed tables.

Files are written atomically (see atomic.py), so a crash never leaves half a
report.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import os
import pathlib
import time
from typing import Any, Mapping

import numpy as np
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto import event_pb2, summary_pb2

from imbal_jax import atomic, plots

PER_CLASS_FIELDS = ('split', 'class', 'train_count', 'support', 'precision', 'recall', 'f1')
# Distinguishes event files that one process opens within the same second
# (tensorboardX names them by time and host only, and would overwrite one).
_WRITER_IDS = itertools.count()


def write_json(path: str | pathlib.Path, payload: Any) -> None:
  # Serialised before anything is written: a payload that fails leaves the old file whole.
  atomic.write_text(path, json.dumps(payload, indent=2, sort_keys=False) + '\n')


def write_csv(path: str | pathlib.Path, header: tuple[str, ...] | list[str],
              rows: list[Mapping[str, Any]]) -> pathlib.Path:
  """One row per mapping; None (an undefined value) becomes an empty cell."""
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=list(header), lineterminator='\n')
  writer.writeheader()
  for row in rows:
    writer.writerow({key: '' if row[key] is None else row[key] for key in header})
  return atomic.write_text(path, buffer.getvalue())


class MetricsLog:
  """Appends one JSON object per logged step to metrics.jsonl."""

  def __init__(self, path: str | pathlib.Path):
    self.path = pathlib.Path(path)

  def write(self, record: dict[str, Any]) -> None:
    with self.path.open('a') as handle:
      handle.write(json.dumps(record) + '\n')
      handle.flush()


class ScalarWriter:
  """Scalar training curves in TensorBoard's event format: `tensorboard --logdir=DIR`.

  `purge_step`: TensorBoard hides the points at steps >= purge_step written by
  earlier writers. A run resumed from a checkpoint at step T writes from step T + 1
  on, so it passes T + 1: the interrupted run's points after the checkpoint go, so
  the curves do not double back, and those at T and before stay.
  """

  def __init__(self, logdir: str | pathlib.Path, purge_step: int | None = None):
    self.logdir = pathlib.Path(logdir)
    self.logdir.mkdir(parents=True, exist_ok=True)
    # tensorboardX's synchronous writer rather than its SummaryWriter, whose
    # background thread flush() does not wait for: events said to be written
    # could be lost with the process.
    # TensorBoard reads a directory's event files in name order, and the name starts
    # with the second it was made in: within one second, the fixed-width writer
    # number keeps a later writer after an earlier one (".10" would sort before ".9",
    # and a resumed run's purge would then come before the points it hides).
    self._events = EventsWriter(str(self.logdir / 'events'),
                                f'.{os.getpid()}.{next(_WRITER_IDS):06d}')
    self._closed = False
    if purge_step is not None:
      self._events.write_event(event_pb2.Event(
          wall_time=time.time(), step=int(purge_step),
          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
      self._events.flush()

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    """One event holding every scalar of `step`, flushed to disk at once
    (called at log steps only, so the flush is cheap)."""
    summary = summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=name, simple_value=float(value))
        for name, value in scalars.items()])
    self._events.write_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                             summary=summary))
    self._events.flush()

  def close(self) -> None:
    if not self._closed:
      self._events.close()
      self._closed = True

  def __enter__(self) -> ScalarWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def per_class_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
  """per_class.csv's rows: one per class and evaluated split (val, then test)."""
  return [{'split': split, **row} for split in ('val', 'test') if split in report
          for row in report[split]['per_class']]


@dataclasses.dataclass(frozen=True)
class SplitPredictions:
  """The selected model's probabilities on one evaluation split, and where each image is."""

  labels: np.ndarray  # [n]
  probabilities: np.ndarray  # [n, classes]
  source_part: str  # the part of the data source the split's images come from
  source_rows: np.ndarray  # [n] the images' rows in that part
  paths: np.ndarray | None = None  # [n] their files, where the source knows them


def eval_prediction_rows(predictions: Mapping[str, SplitPredictions],
                         class_names) -> tuple[list[str], list[dict[str, Any]]]:
  """(header, rows) of eval_predictions.csv: one row per image of each split."""
  header = ['split', 'row', 'source_part', 'source_row', 'path', 'label', 'label_name',
            'predicted', 'predicted_name', 'correct', *(f'p_{name}' for name in class_names)]
  rows = []
  for split, found in predictions.items():
    predicted = np.argmax(found.probabilities, axis=-1)
    for row, (label, guess, probabilities) in enumerate(
        zip(found.labels, predicted, found.probabilities)):
      rows.append({'split': split, 'row': row, 'source_part': found.source_part,
                   'source_row': int(found.source_rows[row]),
                   'path': None if found.paths is None else str(found.paths[row]),
                   'label': int(label), 'label_name': class_names[label],
                   'predicted': int(guess), 'predicted_name': class_names[guess],
                   'correct': int(label == guess),
                   **{f'p_{name}': f'{p:.6g}' for name, p in zip(class_names, probabilities)}})
  return header, rows


def write_run_outputs(workdir: str | pathlib.Path, report: Mapping[str, Any],
                      calibration: Mapping[str, dict],
                      predictions: Mapping[str, SplitPredictions] | None = None
                      ) -> list[pathlib.Path]:
  """per_class.csv, eval_predictions.csv and the pictures of one run, next to its
  report.json.

  Args:
    workdir: the run directory.
    report: the dict written to report.json (val and test are
      `metrics.summarize` outputs).
    calibration: split name -> `metrics.calibration_bins` output; 'test' is drawn.
    predictions: split name -> the selected model's SplitPredictions (none: no
      eval_predictions.csv).

  Returns the paths written.
  """
  workdir = pathlib.Path(workdir)
  written = []
  if predictions:
    header, rows = eval_prediction_rows(predictions, report['class_names'])
    written.append(write_csv(workdir / 'eval_predictions.csv', header, rows))
  return written + [
      write_csv(workdir / 'per_class.csv', PER_CLASS_FIELDS, per_class_rows(report)),
      plots.confusion_matrix_figure(report['test'], report['class_names'],
                                    workdir / 'confusion_matrix_test.png'),
      plots.recall_vs_train_count(report, workdir / 'recall_vs_train_count.png'),
      plots.reliability_diagram(calibration['test'], workdir / 'reliability_test.png'),
  ]


def _pct(value: float | None) -> str:
  return '—' if value is None else f'{100 * value:5.1f}'


def _plain(value: float | None) -> str:
  return '—' if value is None else f'{value:5.3f}'


_MISSING = object()  # a metric that a report written before it existed does not hold


def _metric(key: str):
  return lambda split: split.get(key, _MISSING)


def _group_accuracy(name: str):
  return lambda split: split['groups'][name]['accuracy'] if 'groups' in split else _MISSING


_SUMMARY_ROWS = (  # (row label, value in a summarize() output, formatter)
    ('accuracy', _metric('accuracy'), _pct),
    ('balanced_accuracy', _metric('balanced_accuracy'), _pct),
    ('macro_f1', _metric('macro_f1'), _pct),
    ('head accuracy', _group_accuracy('head'), _pct),
    ('medium accuracy', _group_accuracy('medium'), _pct),
    ('tail accuracy', _group_accuracy('tail'), _pct),
    ('roc_auc_ovr', _metric('roc_auc_ovr'), _pct),
    ('ece', _metric('ece'), _pct),
    ('mcc', _metric('mcc'), _plain),
    ('cohen_kappa', _metric('cohen_kappa'), _plain),
    ('quadratic_kappa', _metric('quadratic_kappa'), _plain),
)


def format_report(report: dict[str, Any]) -> str:
  """A human-readable table: summary per split, then per-class recall.

  Percentages, except MCC and kappa (in [-1, 1]); '—' marks an undefined value.
  """
  splits = [s for s in ('val', 'test') if s in report]
  selection, method = report['selection'], report.get('stage2', {})
  if 'tau' in method:  # a closed-form stage 2: fitted, not trained step by step
    chosen = (f"{method['method']} with tau={method['tau']:g}, chosen on {selection['split']} "
              f"{selection['metric']}")
  elif 'scale' in method:
    chosen = f"{method['method']} (scale {method['scale']:g}), fitted on the training features"
  else:
    chosen = (f"model selected on {selection['split']} {selection['metric']} at step "
              f"{selection['step']} (epoch {selection['epoch']})")
  lines = [f"{report['stage']} on {report['dataset']}: {chosen}", '']
  header = f"{'':18}" + ''.join(f'{s:>10}' for s in splits)
  lines.append(header)
  for label, value, formatter in _SUMMARY_ROWS:
    values = [value(report[s]) for s in splits]
    if all(v is not _MISSING for v in values):
      lines.append(f'{label:18}' + ''.join(f'{formatter(v):>10}' for v in values))
  lines += ['', f"{'class':>12}{'train n':>9}" + ''.join(f'{s + " recall":>13}' for s in splits)]
  for index, name in enumerate(report['class_names']):
    row = f"{name[:12]:>12}{report['train_counts'][index]:>9}"
    row += ''.join(f"{_pct(report[s]['per_class'][index]['recall']):>13}" for s in splits)
    lines.append(row)
  return '\n'.join(lines)
