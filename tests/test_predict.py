"""imbal_jax.predict on tiny trained runs: the same probabilities as the run's own
evaluation, every input accounted for, and one clear message for bad workdirs or inputs."""

import csv
import importlib.util
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from imbal_jax import checkpoint, predict, train
from imbal_jax.data import inference_inputs, sources
from imbal_jax.models import Stage1Net, make_encoder


def load_config(name):
  spec = importlib.util.spec_from_file_location(f'cfg_{name}', ROOT / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


TINY = dict(model='resnet18', width=4, num_epochs=1, warmup_epochs=0, batch_size=32,
            eval_batch_size=64, log_every_steps=5)


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  """A parent folder with stage1/ and stage2/, as `make demo` writes them."""
  root = tmp_path_factory.mktemp('demo')
  config = load_config('stage1')
  config.update(TINY)
  train.train_and_evaluate(config, str(root / 'stage1'))
  config = load_config('stage2')
  config.update(TINY)
  config.init_from = str(root / 'stage1')
  train.train_and_evaluate(config, str(root / 'stage2'))
  return root


@pytest.fixture(scope='module')
def digits_test(root):
  """The stage-1 run's test split, exactly as it was evaluated."""
  run_dir = root / 'stage1'
  config = ml_collections.ConfigDict(json.loads((run_dir / 'config.json').read_text()))
  spec = json.loads((run_dir / 'data.json').read_text())['spec']
  split = sources.load(config, sources.spec_from_json(spec)).splits['test']
  return split.take(np.arange(len(split))), split.labels


def read_rows(path):
  with open(path, newline='') as handle:
    return list(csv.DictReader(handle))


def probability_columns(rows):
  return np.asarray([[float(row[f'p_{c}']) for c in range(10)] for row in rows])


def independent_probabilities(run_dir, images):
  """Stage-1 probabilities on the host: restored variables, plain model.apply, no mesh."""
  config = json.loads((run_dir / 'config.json').read_text())
  data = json.loads((run_dir / 'data.json').read_text())
  model = Stage1Net(encoder=make_encoder(config['model'], config['width'], images.shape[1]),
                    num_classes=10, projection_dim=config['projection_dim'])
  like = model.init(jax.random.key(1), jnp.zeros((1,) + images.shape[1:]), train=False)
  variables, _ = checkpoint.restore_best(run_dir, like)
  x = (images / 255.0 - np.asarray(data['pixel_mean'])) / np.asarray(data['pixel_std'])
  logits, _ = model.apply(variables, jnp.asarray(x, jnp.float32), train=False)
  return np.asarray(nn.softmax(logits))


def test_test_split_npz_reproduces_the_runs_evaluation(root, digits_test, tmp_path, capsys):
  images, labels = digits_test
  # MedMNIST layout: several *_images arrays, test_images is the one predicted.
  npz = tmp_path / 'digits.npz'
  np.savez(npz, train_images=images[:5], test_images=images[..., 0], test_labels=labels)
  predictions, path, model = predict.predict(root / 'stage1', npz, tmp_path / 'out.csv')
  assert model.run_dir == root / 'stage1' and model.stage == 'stage1'
  assert 'predicting test_images' in capsys.readouterr().out

  expected = independent_probabilities(root / 'stage1', images)
  np.testing.assert_allclose(predictions.probabilities, expected, atol=1e-5)
  np.testing.assert_array_equal(predictions.predicted_index, expected.argmax(axis=1))
  accuracy = np.mean(predictions.predicted_index == labels)
  report = json.loads((root / 'stage1' / 'report.json').read_text())
  assert accuracy == pytest.approx(report['test']['accuracy'], abs=1e-12)
  # The in-memory API gives the same numbers.
  np.testing.assert_array_equal(model.probabilities(images), predictions.probabilities)

  rows = read_rows(path)
  assert list(rows[0]) == ['input', 'predicted_class', 'predicted_index',
                           *(f'p_{c}' for c in range(10)), 'status']
  assert [row['input'] for row in rows] == [str(i) for i in range(len(images))]
  assert {row['status'] for row in rows} == {'ok'}
  assert [int(row['predicted_index']) for row in rows] == predictions.predicted_index.tolist()
  assert [row['predicted_class'] for row in rows] == [row['predicted_index'] for row in rows]
  written = probability_columns(rows)
  np.testing.assert_allclose(written, predictions.probabilities, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(written.sum(axis=1), 1.0, atol=1e-5)


def test_parent_folder_prefers_trained_stage2(root, digits_test, tmp_path, capsys):
  images, labels = digits_test
  np.savez(tmp_path / 'test.npz', images=images)
  predictions, path, model = predict.predict(root, tmp_path / 'test.npz', batch_size=128)
  assert model.run_dir == root / 'stage2' and model.stage == 'stage2'
  assert path == root / 'predictions.csv'
  accuracy = np.mean(predictions.predicted_index == labels)
  report = json.loads((root / 'stage2' / 'report.json').read_text())
  assert accuracy == pytest.approx(report['test']['accuracy'], abs=1e-12)
  # A second prediction into the default file keeps the first one.
  first = path.read_text()
  np.savez(tmp_path / 'three.npz', images=images[:3])
  _, again, _ = predict.predict(root, tmp_path / 'three.npz', batch_size=128)
  assert again == path and len(again.read_text().splitlines()) == 4
  kept = max(root.glob('predictions.*.csv'), key=lambda p: int(p.stem.split('.')[1]))
  assert kept.read_text() == first
  # Without a finished stage-2 checkpoint, stage 1 is used.
  parent = tmp_path / 'parent'
  (parent / 'stage2' / 'best').mkdir(parents=True)
  (parent / 'stage2' / 'config.json').write_text('{}')
  (parent / 'stage1').symlink_to(root / 'stage1')
  assert predict.find_run(parent) == parent / 'stage1'
  assert predict.find_run(root / 'stage1') == root / 'stage1'
  assert predict.find_run(root / 'stage2') == root / 'stage2'
  # A stage 2 stopped before its end gives way to a finished stage 1; alone, it is used,
  # and said to be unfinished.
  import shutil
  unfinished = tmp_path / 'unfinished'
  shutil.copytree(root / 'stage2', unfinished / 'stage2')
  (unfinished / 'stage2' / 'report.json').unlink()
  (unfinished / 'stage1').symlink_to(root / 'stage1')
  assert predict.find_run(unfinished) == unfinished / 'stage1'
  capsys.readouterr()
  predict.predict(unfinished / 'stage2', tmp_path / 'three.npz', tmp_path / 'u.csv',
                  batch_size=128)
  assert (f'note: {unfinished / "stage2"} has not finished training (no report.json)'
          in capsys.readouterr().out)


def write_png(path, image, mode):
  path.parent.mkdir(parents=True, exist_ok=True)
  pixels = image[..., 0] if mode == 'L' else np.repeat(image, 3, axis=-1)
  Image.fromarray(pixels, mode).save(path)


def test_folder_of_images_reports_unreadable_files_by_name(root, digits_test, tmp_path, capsys):
  images = digits_test[0][:6]
  folder = tmp_path / 'images'
  names = []
  for i, image in enumerate(images):
    # Grey and RGB files, nested: both must decode to the training pixels.
    path = folder / f'part{i % 2}' / f'image{i}.png'
    write_png(path, image, 'L' if i % 2 else 'RGB')
    names.append(str(path))
  (folder / 'part0' / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n not really a png')
  (folder / 'notes.txt').write_text('not an image')
  predictions, path, _ = predict.predict(root / 'stage1', folder, tmp_path / 'folder.csv')
  out = capsys.readouterr().out
  assert 'left out 1 file(s) without an image suffix' in out and 'notes.txt' in out
  assert 'Predicted 6 of 7 input(s); 1 failed' in out and 'corrupt.png' in out

  rows = {row['input']: row for row in read_rows(path)}
  corrupt = str(folder / 'part0' / 'corrupt.png')
  assert sorted(rows) == sorted(names + [corrupt])
  assert corrupt in rows[corrupt]['status'] and 'cannot decode' in rows[corrupt]['status']
  assert rows[corrupt]['predicted_class'] == '' and rows[corrupt]['p_0'] == ''
  ok = [rows[name] for name in names]
  assert all(row['status'] == 'ok' for row in ok)
  np.testing.assert_allclose(probability_columns(ok).sum(axis=1), 1.0, atol=1e-5)
  # The PNG round trip is exact at the model's size: the same probabilities as the arrays.
  expected = independent_probabilities(root / 'stage1', images)
  np.testing.assert_allclose(probability_columns(ok), expected, rtol=1e-4, atol=1e-6)


def test_csv_with_missing_path_gets_an_error_row(root, digits_test, tmp_path):
  images = digits_test[0][:2]
  for i, image in enumerate(images):
    write_png(tmp_path / 'scans' / f'{i}.png', image, 'L')
  listing = tmp_path / 'list.csv'
  listing.write_text('path,note\nscans/0.png,a\nscans/missing.png,b\nscans/1.png,c\n')
  predictions, path, _ = predict.predict(root / 'stage1', listing, tmp_path / 'list_out.csv')
  rows = read_rows(path)
  assert [row['input'] for row in rows] == ['scans/0.png', 'scans/missing.png', 'scans/1.png']
  assert [row['status'] for row in rows][::2] == ['ok', 'ok']
  assert 'missing.png: no such file' in rows[1]['status']
  assert rows[1]['predicted_index'] == ''
  np.testing.assert_allclose(probability_columns(rows[::2]).sum(axis=1), 1.0, atol=1e-5)
  assert predictions.predicted_index[1] == -1


def test_npz_of_another_size_and_channel_count_is_conformed(root, digits_test, tmp_path, capsys):
  images = digits_test[0][:4]
  rgb = np.stack([np.asarray(Image.fromarray(im[..., 0]).convert('RGB').resize((16, 16)))
                  for im in images])
  np.savez(tmp_path / 'big.npz', images=rgb)
  predictions, _, _ = predict.predict(root / 'stage1', tmp_path / 'big.npz',
                                      tmp_path / 'big.csv')
  out = capsys.readouterr().out
  assert 'converted to grey' in out and 'images are 16x16: resized' in out
  assert predictions.status == ['ok'] * 4
  conformed = inference_inputs.conform(rgb[0], (8, 8, 1))
  assert conformed.shape == (8, 8, 1) and conformed.dtype == np.uint8
  # Grey to RGB repeats the channel; RGB to grey uses the ITU-R 601 weights, rounded.
  assert inference_inputs.conform(images[0], (8, 8, 3)).tolist() == np.repeat(images[0], 3, -1).tolist()
  pixel = np.asarray([[[200, 100, 50]]], np.uint8)
  assert inference_inputs.conform(pixel, (1, 1, 1))[0, 0, 0] == round(0.299 * 200 + 0.587 * 100 + 5.7)


def test_bad_workdirs_inputs_and_batch_sizes(root, tmp_path):
  (tmp_path / 'untrained').mkdir()
  with pytest.raises(predict.PredictError, match='holds no trained model.*Train first'):
    predict.predict(tmp_path / 'untrained', tmp_path)
  with pytest.raises(predict.PredictError, match='is not a directory'):
    predict.find_run(tmp_path / 'nowhere')
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'readme.txt').write_text('no images here')
  cases = [(tmp_path / 'missing.npz', 'does not exist'),
           (tmp_path / 'empty', 'holds no image files'),
           (tmp_path / 'readme.md', 'expected a folder of images')]
  (tmp_path / 'readme.md').write_text('#')
  np.savez(tmp_path / 'labels_only.npz', labels=np.zeros(3))
  cases.append((tmp_path / 'labels_only.npz', r'no `images` array'))
  np.savez(tmp_path / 'floats.npz', images=np.zeros((2, 8, 8), np.float32))
  cases.append((tmp_path / 'floats.npz', 'must be uint8'))
  # A damaged deflate stream raises zlib.error, which is not an OSError.
  np.savez_compressed(tmp_path / 'damaged.npz', images=np.random.default_rng(0).integers(
      0, 256, (20, 8, 8), dtype=np.uint8))
  damaged = bytearray((tmp_path / 'damaged.npz').read_bytes())
  damaged[60:64] = b'\xff\xff\xff\xff'
  (tmp_path / 'damaged.npz').write_bytes(bytes(damaged))
  cases.append((tmp_path / 'damaged.npz', r'damaged.npz: cannot read images .*decompressing'))
  (tmp_path / 'nopath.csv').write_text('file\na.png\n')
  cases.append((tmp_path / 'nopath.csv', r'no `path` column'))
  for input_path, message in cases:
    with pytest.raises(predict.PredictError, match=message):
      predict.predict(root / 'stage1', input_path)
  np.savez(tmp_path / 'ok.npz', images=np.zeros((3, 8, 8), np.uint8))
  with pytest.raises(predict.PredictError, match='--batch_size=12 is the GLOBAL batch'):
    predict.predict(root / 'stage1', tmp_path / 'ok.npz', tmp_path / 'x.csv', batch_size=12)
  # An output that cannot be written is found before the model is built.
  with pytest.raises(predict.PredictError, match=r'ok.npz is a file, not a directory'):
    predict.predict(root / 'stage1', tmp_path / 'ok.npz', tmp_path / 'ok.npz' / 'out.csv')


def test_command_exits_2_with_one_message(tmp_path):
  (tmp_path / 'untrained').mkdir()
  result = subprocess.run(
      [sys.executable, '-m', 'imbal_jax.predict', f'--workdir={tmp_path / "untrained"}',
       f'--input={tmp_path}'], cwd=ROOT, env=dict(os.environ), capture_output=True, text=True,
      timeout=120)
  assert result.returncode == 2
  assert 'holds no trained model' in result.stderr and 'Train first' in result.stderr
  assert 'Traceback' not in result.stderr


def test_image_file_inputs_say_how_they_are_decoded(tmp_path):
  write_png(tmp_path / 'one.png', np.zeros((45, 60, 1), np.uint8), 'L')
  inputs = inference_inputs.read_inputs(tmp_path / 'one.png', (8, 8, 1))
  assert inputs.notes == ('image files are decoded as the training images were: shorter side '
                          'resized to 8 px and centre-cropped to 8x8, then made grey (ITU-R 601 '
                          'luma).',)
  assert inputs.read(0).shape == (8, 8, 1)
  (tmp_path / 'list.csv').write_text('path\none.png\n')
  assert inference_inputs.read_inputs(tmp_path / 'list.csv', (8, 8, 3)).notes[-1].endswith(
      'centre-cropped to 8x8.')
  # 16-bit files with the training run's bit depth (predict passes its config.bit_depth).
  from PIL import Image
  Image.fromarray(np.full((8, 8), 3000, np.uint16)).save(tmp_path / 'xray.png')
  for depth, value in ((12, 3000 >> 4), (16, 3000 >> 8)):
    image = inference_inputs.read_inputs(tmp_path / 'xray.png', (8, 8, 1), depth).read(0)
    assert (image == value).all(), depth


def test_csv_labels_are_checked_kept_and_scored(root, digits_test, tmp_path, capsys):
  images, labels = digits_test[0][:12], digits_test[1][:12]
  lines = ['path,label']
  for i, (image, label) in enumerate(zip(images, labels)):
    write_png(tmp_path / 'scans' / f'{i}.png', image, 'L')
    lines.append(f'scans/{i}.png,{label if i else ""}')  # the first row has no label
  lines.append('scans/missing.png,3')  # labelled, but cannot be read
  (tmp_path / 'labelled.csv').write_text('\n'.join(lines) + '\n')
  predictions, path, _ = predict.predict(root / 'stage1', tmp_path / 'labelled.csv',
                                         tmp_path / 'out.csv')
  rows = read_rows(path)
  assert [row['label'] for row in rows] == [''] + [str(l) for l in labels[1:]] + ['3']
  # NumPy reference over the 11 labelled rows that were read.
  truth = labels[1:]
  guess = predictions.predicted_index[1:12]
  recalls = [np.mean(guess[truth == c] == c) for c in np.unique(truth)]
  out = capsys.readouterr().out
  assert (f'On the 11 labelled input(s) read: accuracy {100 * np.mean(truth == guess):.1f}%, '
          f'balanced accuracy {100 * np.mean(recalls):.1f}%') in out
  # A label the model does not know is refused before anything is computed.
  (tmp_path / 'bad.csv').write_text('path,label\nscans/0.png,melanoma\n')
  with pytest.raises(predict.PredictError, match=r"label\(s\) \['melanoma'\] are not classes"):
    predict.predict(root / 'stage1', tmp_path / 'bad.csv', tmp_path / 'bad_out.csv')
  assert not (tmp_path / 'bad_out.csv').exists()
