"""The pictures of a run and of a comparison, as PNG files.

Figures are built with matplotlib's object API (`Figure`, never pyplot), which
renders with Agg and touches neither a display nor matplotlib's global state,
so plotting is safe on a headless training host and inside a notebook alike.
Each function writes its file atomically and returns the path.
"""

from __future__ import annotations

import io
import pathlib
import textwrap
from typing import Any, Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from imbal_jax import atomic

DPI = 120
# Past this many classes, numbers in the cells would be unreadable.
MAX_ANNOTATED_CLASSES = 20


# Characters per line of a method's name in the comparison chart.
NAME_WIDTH = 48


def _save(figure: Figure, path: str | pathlib.Path) -> pathlib.Path:
  buffer = io.BytesIO()
  figure.savefig(buffer, format='png', dpi=DPI)
  return atomic.write_bytes(path, buffer.getvalue())


def _draw_matrix(axes, figure: Figure, values: np.ndarray, class_names: Sequence[str],
                 title: str, labels: np.ndarray | None, vmax: float) -> None:
  # Grey marks a row with no examples: its recall is undefined, not 0.
  cmap = matplotlib.colormaps['Blues'].with_extremes(bad='0.85')
  image = axes.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0, vmax=vmax)
  figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
  ticks = np.arange(len(class_names))
  axes.set_xticks(ticks, class_names, rotation=45, ha='right', rotation_mode='anchor')
  axes.set_yticks(ticks, class_names)
  axes.set_xlabel('predicted class')
  axes.set_ylabel('true class')
  axes.set_title(title)
  if labels is None:
    return
  for (row, column), text in np.ndenumerate(labels):
    value = values[row, column]
    dark = np.isfinite(value) and value > 0.6 * vmax
    axes.text(column, row, text, ha='center', va='center', fontsize=8,
              color='white' if dark else 'black')


def confusion_matrix_figure(report_split: Mapping[str, Any], class_names: Sequence[str],
                            path: str | pathlib.Path) -> pathlib.Path:
  """Counts and row-normalised (recall on the diagonal) confusion matrices, side by side.

  `report_split` is a `metrics.summarize` output.
  """
  counts = np.asarray(report_split['confusion_matrix'], np.float64)
  support = counts.sum(axis=1, keepdims=True)
  with np.errstate(invalid='ignore', divide='ignore'):
    normalised = np.where(support > 0, counts / support, np.nan)
  annotate = len(class_names) <= MAX_ANNOTATED_CLASSES
  side = max(4.5, 0.45 * len(class_names) + 2.5)
  figure = Figure(figsize=(2 * side + 1, side), layout='constrained')
  left, right = figure.subplots(1, 2)
  _draw_matrix(left, figure, counts, class_names, 'counts',
               counts.astype(np.int64).astype(str) if annotate else None,
               vmax=max(counts.max(), 1.0))
  percent = 100 * normalised
  _draw_matrix(right, figure, percent, class_names, 'row-normalised (%; recall on the diagonal)',
               np.where(np.isfinite(percent), np.char.mod('%.0f', np.nan_to_num(percent)), '—')
               if annotate else None, vmax=100.0)
  figure.suptitle(f"{report_split['num_examples']} images: accuracy "
                  f"{100 * report_split['accuracy']:.1f}%, balanced accuracy "
                  f"{100 * report_split['balanced_accuracy']:.1f}%")
  return _save(figure, path)


def recall_vs_train_count(report: Mapping[str, Any], path: str | pathlib.Path) -> pathlib.Path:
  """Per-class recall on val and test against the class's training count (log x)."""
  train_counts = np.asarray(report['train_counts'], np.float64)
  figure = Figure(figsize=(8, 5), layout='constrained')
  axes = figure.subplots()
  styles = {'val': dict(marker='s', color='tab:orange'), 'test': dict(marker='o', color='tab:blue')}
  label_heights = {}
  for split in ('val', 'test'):
    if split not in report:
      continue
    recall = np.array([np.nan if row['recall'] is None else row['recall']
                       for row in report[split]['per_class']])
    shown = np.isfinite(recall)  # a class absent from the split has no recall to show
    axes.scatter(train_counts[shown], 100 * recall[shown], s=36, alpha=0.8, label=split,
                 **styles[split])
    for c in np.flatnonzero(shown):
      label_heights[c] = 100 * recall[c]  # test wins: it is drawn last
  for c, height in label_heights.items():
    axes.annotate(report['class_names'][c], (train_counts[c], height), fontsize=8,
                  xytext=(4, 4), textcoords='offset points')
  if (train_counts > 0).all():
    axes.set_xscale('log')
  else:  # a class with no training image cannot sit on a log axis
    axes.set_xscale('symlog', linthresh=1)
  axes.set_ylim(-3, 105)
  axes.set_xlabel('training images of the class (log scale)')
  axes.set_ylabel('recall (%)')
  axes.grid(True, which='both', alpha=0.3)
  axes.legend(loc='lower right')
  axes.set_title(f"{report['stage']} on {report['dataset']}: per-class recall")
  return _save(figure, path)


def reliability_diagram(bins: Mapping[str, Any], path: str | pathlib.Path) -> pathlib.Path:
  """Accuracy against confidence per bin, with the bin sizes below.

  `bins` is a `metrics.calibration_bins` output. Red bars show the gap to
  perfect calibration (the diagonal); their size-weighted mean is the ECE.
  """
  edges = np.asarray(bins['edges'])
  count = np.asarray(bins['count'])
  filled = count > 0
  accuracy = np.array([a if a is not None else 0.0 for a in bins['accuracy']])
  confidence = np.array([c if c is not None else 0.0 for c in bins['confidence']])
  centres, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
  ece = float(np.sum(count[filled] * np.abs(accuracy - confidence)[filled]) / max(count.sum(), 1))

  figure = Figure(figsize=(5.5, 6.5), layout='constrained')
  top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
  top.bar(centres[filled], accuracy[filled], width[filled], color='tab:blue',
          edgecolor='black', linewidth=0.5, label='accuracy')
  top.bar(centres[filled], np.abs(accuracy - confidence)[filled], width[filled],
          bottom=np.minimum(accuracy, confidence)[filled], color='tab:red', alpha=0.35,
          edgecolor='tab:red', hatch='//', label='gap to mean confidence')
  top.plot([0, 1], [0, 1], '--', color='0.3', zorder=3, label='perfect calibration')
  top.set_xlim(edges[0], edges[-1])
  top.set_ylim(0, 1)
  top.set_ylabel('accuracy')
  top.set_title(f'reliability: ECE {100 * ece:.1f}% ({len(count)} bins, {count.sum()} images)')
  top.legend(loc='upper left', fontsize=8)
  bottom.bar(centres, count, width, color='0.5', edgecolor='black', linewidth=0.5)
  bottom.set_xlabel('top-1 confidence')
  bottom.set_ylabel('images')
  return _save(figure, path)


def method_bar_figure(names: Sequence[str], means: Sequence[float],
                      stds: Sequence[float | None], per_run: Sequence[Sequence[float]] = (),
                      label: str = 'test balanced accuracy (%)') -> Figure:
  """method_bar_chart's figure: one horizontal bar per method, the first on top.

  Horizontal, with each name wrapped on the left: names of methods that differ in
  several fields run to a hundred characters, which slanted labels under vertical
  bars could not fit.
  """
  wrapped = [textwrap.fill(name, NAME_WIDTH) for name in names]
  lines = sum(name.count('\n') + 1 for name in wrapped)
  positions = np.arange(len(names))
  errors = [np.nan if s is None else 100 * s for s in stds]  # NaN: no bar for one seed
  figure = Figure(figsize=(9.0, 1.4 + 0.3 * lines + 0.25 * len(names)), layout='constrained')
  axes = figure.subplots()
  axes.barh(positions, 100 * np.asarray(means, np.float64), xerr=errors, capsize=5,
            color='tab:blue', alpha=0.75, edgecolor='black', linewidth=0.5)
  for position, values in zip(positions, per_run):
    axes.scatter(100 * np.asarray(values, np.float64), np.full(len(values), position), s=14,
                 color='black', zorder=3)
  axes.set_yticks(positions, wrapped, fontsize=8)
  axes.invert_yaxis()
  axes.set_xlabel(label)
  axes.set_xlim(0, 100)
  axes.grid(True, axis='x', alpha=0.3)
  axes.set_title('mean ± sample std over seeds; dots: single runs')
  return figure


def method_bar_chart(names: Sequence[str], means: Sequence[float],
                     stds: Sequence[float | None], path: str | pathlib.Path,
                     per_run: Sequence[Sequence[float]] = (),
                     ylabel: str = 'test balanced accuracy (%)') -> pathlib.Path:
  """One bar per method (values in [0, 1], drawn as %), sample-std error bars
  where there are several seeds, and each run as a dot (method_bar_figure)."""
  return _save(method_bar_figure(names, means, stds, per_run, ylabel), path)
