"""The pictures and per_class.csv of a run: valid files with the right content."""

import csv

import numpy as np
import pytest
from PIL import Image

import fake_runs
from imbal_jax import metrics, plots, reporting

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def check_png(path, min_size=(300, 300)):
  data = path.read_bytes()
  assert data.startswith(PNG_SIGNATURE), path
  with Image.open(path) as image:
    image.verify()  # checks the chunks' CRCs
  with Image.open(path) as image:
    assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1], image.size
    # Something was drawn: a blank canvas has one colour (None: more than the maximum).
    colors = image.convert('RGB').getcolors(maxcolors=1 << 16)
    assert colors is None or len(colors) > 10


def test_write_run_outputs(tmp_path):
  report, calibration = fake_runs.fake_report(seed=3, test_absent=(5,))
  paths = reporting.write_run_outputs(tmp_path, report, calibration)
  names = ['per_class.csv', 'confusion_matrix_test.png', 'recall_vs_train_count.png',
           'reliability_test.png']
  assert paths == [tmp_path / name for name in names]
  for path in paths[1:]:
    check_png(path)
  # Nothing is left behind by the atomic writes.
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)

  with (tmp_path / 'per_class.csv').open(newline='') as handle:
    rows = list(csv.DictReader(handle))
  assert list(rows[0]) == list(reporting.PER_CLASS_FIELDS)
  num_classes = len(fake_runs.CLASS_NAMES)
  assert [row['split'] for row in rows] == ['val'] * num_classes + ['test'] * num_classes
  for row, split, index in zip(rows, ['val'] * num_classes + ['test'] * num_classes,
                               list(range(num_classes)) * 2):
    expected = report[split]['per_class'][index]
    assert row['class'] == fake_runs.CLASS_NAMES[index]
    assert int(row['train_count']) == fake_runs.TRAIN_COUNTS[index]
    assert int(row['support']) == expected['support']
    for key in ('precision', 'recall', 'f1'):
      if expected[key] is None:
        assert row[key] == ''
      else:
        assert float(row[key]) == expected[key]  # repr round-trips a float exactly
  # The absent test class: recall undefined, written as an empty cell.
  assert rows[-1]['split'] == 'test' and rows[-1]['support'] == '0' and rows[-1]['recall'] == ''


def test_rewriting_replaces_the_files(tmp_path):
  report, calibration = fake_runs.fake_report(seed=0)
  first = reporting.write_run_outputs(tmp_path, report, calibration)
  before = [path.read_bytes() for path in first]
  report, calibration = fake_runs.fake_report(seed=1, skill=0.5)
  second = reporting.write_run_outputs(tmp_path, report, calibration)
  assert first == second
  assert all(path.read_bytes() != old for path, old in zip(second, before))
  assert len(list(tmp_path.iterdir())) == 4


def test_confusion_matrix_of_many_classes_and_a_missing_row(tmp_path):
  rng = np.random.default_rng(0)
  names = [f'class {c}' for c in range(30)]  # past MAX_ANNOTATED_CLASSES: no numbers in cells
  labels = rng.integers(1, 30, size=500)  # class 0 absent: its normalised row is grey
  probabilities = rng.dirichlet(np.ones(30), size=500)
  with pytest.warns(UserWarning, match='absent'):
    split = metrics.summarize(labels, probabilities, names, list(range(30, 0, -1)))
  check_png(plots.confusion_matrix_figure(split, names, tmp_path / 'sub' / 'cm.png'))


def test_recall_plot_with_a_class_without_training_images(tmp_path):
  report, _ = fake_runs.fake_report(seed=2)
  report['train_counts'] = [300, 120, 60, 30, 12, 0]
  del report['val']  # a report with the test split only
  check_png(plots.recall_vs_train_count(report, tmp_path / 'recall.png'))


def test_reliability_diagram_with_empty_bins(tmp_path):
  labels = np.array([0, 1, 1])
  probabilities = np.array([[0.95, 0.05], [0.9, 0.1], [0.45, 0.55]])
  bins = metrics.calibration_bins(labels, probabilities)
  assert bins['count'].count(0) == 12  # 0.55, 0.9 and 0.95 in bins 8, 13 and 14
  check_png(plots.reliability_diagram(bins, tmp_path / 'reliability.png'))


def test_method_bar_chart(tmp_path):
  path = plots.method_bar_chart(['a', 'b'], [0.7, 0.6], [0.05, None], tmp_path / 'bars.png',
                                per_run=[[0.65, 0.75], [0.6]])
  check_png(path)


def test_method_bar_chart_fits_long_method_names():
  import warnings
  names = [f'stage1 lambda=0.5 (data_path=/data/{i}/images, dataset=folder, image_size=32, '
           f'imbalance_ratio={i})' for i in range(6)]
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # e.g. 'constrained_layout not applied'
    figure = plots.method_bar_figure(names, [0.5] * 6, [0.1] * 6, [[0.4, 0.6]] * 6)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
  renderer = canvas.get_renderer()
  box = figure.bbox
  axes = figure.axes[0]
  labels = axes.get_yticklabels()
  # Wrapped, in order (first on top), and every line inside the figure.
  assert [label.get_text().replace('\n', ' ') for label in labels] == names
  assert all(max(map(len, label.get_text().split('\n'))) <= plots.NAME_WIDTH for label in labels)
  for label in labels + [axes.title]:
    extent = label.get_window_extent(renderer)
    assert extent.x0 >= box.x0 - 1 and extent.x1 <= box.x1 + 1, label.get_text()
  assert axes.yaxis_inverted()
