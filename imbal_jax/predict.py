"""Predict with a trained run:

  python -m imbal_jax.predict --workdir=DIR --input=PATH [--output=FILE.csv] [--batch_size=N]

DIR is a run directory (stage 1 or stage 2), or a folder holding stage1/ and
stage2/ runs as `make demo` writes them: the stage-2 model is used when it has
been trained, else stage 1. In every case the variables are those selected on
the validation split (DIR/best/). PATH is a folder of images (searched
recursively), a .npz with an `images` array (or MedMNIST's `test_images`), a
CSV with a `path` column (paths relative to the CSV's folder), or one image.
Images are decoded, resized and normalised as the run's data was, then given
the model's channel count (RGB to grey with the ITU-R 601 luma weights).

The output CSV (default DIR/predictions.csv; an earlier one there is kept as
predictions.N.csv, while a named --output is replaced) has one row per input: input,
predicted_class, predicted_index, p_<class> per class and status. An input
that cannot be read keeps its row, with the error in `status` and no
probabilities; the exit status is 0 once the CSV is written. A DIR without a
trained model, or a PATH that holds no images, exits with status 2.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import functools
import io
import json
import os
import pathlib
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from jax.sharding import Mesh
from tqdm import tqdm

from imbal_jax import atomic, checkpoint, classifiers, sharding, steps
from imbal_jax import workdir as workdir_lib
from imbal_jax.data import imagefiles
from imbal_jax.data.inference_inputs import Inputs, PredictError, read_inputs
from imbal_jax.data.sources import DataError
from imbal_jax.models import Stage1Net, make_encoder

FLAGS = flags.FLAGS




def _has_model(run_dir: pathlib.Path) -> bool:
  best = run_dir / 'best'
  # Orbax renames a step folder to its bare number only once the save is complete.
  return ((run_dir / 'config.json').is_file() and best.is_dir()
          and any(p.is_dir() and p.name.isdigit() for p in best.iterdir()))


def find_run(workdir: str | pathlib.Path) -> pathlib.Path:
  """The run to predict with: DIR/stage2, DIR or DIR/stage1, the first that finished
  (wrote its report.json); where none has, the first with a trained model (is_finished
  tells the caller)."""
  workdir = pathlib.Path(workdir)
  if not workdir.is_dir():
    raise PredictError(f'--workdir={workdir} is not a directory; point it at the workdir of a '
                       'training run (python -m imbal_jax.main ... --workdir=DIR).')
  trained = [c for c in (workdir / 'stage2', workdir, workdir / 'stage1') if _has_model(c)]
  finished = [c for c in trained if is_finished(c)]
  if finished or trained:
    return (finished or trained)[0]
  raise PredictError(
      f'{workdir} holds no trained model: no config.json with a finished best/ checkpoint in it, '
      f'nor in its stage2/ or stage1/ sub-folders. Train first, e.g. python -m imbal_jax.main '
      f'--config=configs/stage1.py --workdir={workdir} (a run saves best/ at its first '
      'evaluation).')


def is_finished(run_dir: pathlib.Path) -> bool:
  """Whether the run trained to its end (its report.json is written last)."""
  return (run_dir / 'report.json').is_file()


def _read_json(path: pathlib.Path) -> dict[str, Any]:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as error:
    raise PredictError(f'{path}: cannot read the run\'s record ({error}); the run directory is '
                       'incomplete: train again in a fresh workdir.') from None


@dataclasses.dataclass(frozen=True)
class Model:
  """A trained run's classifier, restored onto the device mesh."""

  run_dir: pathlib.Path
  stage: str
  class_names: tuple[str, ...]
  image_shape: tuple[int, int, int]  # what the network reads: [height, width, channels]
  eval_batch_size: int  # the run's own evaluation batch
  selection: dict[str, Any]  # best/'s info: step, metric, score
  variables: Any  # replicated over `mesh`
  mesh: Mesh
  probabilities_fn: Callable  # jitted (variables, {'image': uint8 batch}) -> probabilities

  def predict_batch(self, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Probabilities [n, classes] of at most `batch_size` uint8 images (padded to it)."""
    count = len(images)
    pad = batch_size - count
    if pad:
      images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], np.uint8)])
    batch = sharding.put_global_batch({'image': images}, self.mesh)
    # Pulled back before the next batch is sent: many queued collective programs can
    # deadlock the CPU backend (see train.evaluate).
    return np.asarray(jax.device_get(self.probabilities_fn(self.variables, batch)))[:count]

  def probabilities(self, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    """Probabilities of uint8 images already in the model's shape, one batch at a time."""
    batch_size = choose_batch_size(batch_size, self.eval_batch_size, len(images), self.mesh)
    return np.concatenate([self.predict_batch(images[i:i + batch_size], batch_size)
                           for i in range(0, len(images), batch_size)])


def _build_model(run_dir: pathlib.Path, config: dict, data: dict, mesh: Mesh | None) -> Model:
  """Rebuilds the network exactly as train.py does and restores best/ into it."""
  mesh = mesh or sharding.make_mesh()
  class_names = tuple(data['class_names'])
  image_shape = tuple(data['image_shape'])
  # The run's compute dtype (runs from before config.dtype existed are float32).
  dtype = config.get('dtype', 'float32')
  encoder = make_encoder(config['model'], config['width'], image_shape[0], dtype)
  dummy = jnp.zeros((1,) + image_shape, jnp.float32)
  if config.get('stage') == 'stage1':
    network = Stage1Net(encoder=encoder, num_classes=len(class_names),
                        projection_dim=config['projection_dim'], dtype=jnp.dtype(dtype))
    init = lambda: network.init(jax.random.key(0), dummy, train=False)
    logits_fn = functools.partial(steps.stage1_logits, model=network)
  elif config.get('stage') == 'stage2':
    # Runs from before config.stage2_method existed are cRT.
    method = config.get('stage2_method', 'crt')
    if method not in classifiers.METHODS:
      raise PredictError(f'{run_dir / "config.json"}: unknown stage2_method {method!r}; this '
                         f'version predicts with {", ".join(classifiers.METHODS)}.')
    trunk, head = classifiers.modules(method, encoder, len(class_names))

    def init():
      trunk_variables = trunk.init(jax.random.key(0), dummy, train=False)
      features = trunk.apply(trunk_variables, dummy, train=False)
      return {'encoder': trunk_variables, 'head': head.init(jax.random.key(0), features)}

    logits_fn = functools.partial(steps.stage2_logits, encoder=trunk, head=head)
  else:
    raise PredictError(f'{run_dir / "config.json"}: unknown stage {config.get("stage")!r}.')
  replicated = sharding.replicated(mesh)
  # Shapes only: nothing is initialised, the checkpoint fills every variable.
  like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                      jax.eval_shape(init))
  try:
    variables, selection = checkpoint.restore_best(run_dir, like)
  except Exception as error:  # orbax raises many types for a damaged or mismatched checkpoint
    raise PredictError(f'{run_dir / "best"}: cannot restore the selected checkpoint '
                       f'({type(error).__name__}: {error}).') from error
  probabilities_fn = steps.jit_eval_step(logits_fn, mesh,
                                         (data['pixel_mean'], data['pixel_std']))
  return Model(run_dir, config['stage'], class_names, image_shape, _eval_batch_size(config),
               selection, variables, mesh, probabilities_fn)


def _eval_batch_size(config: dict) -> int:
  return int(config.get('eval_batch_size') or 256)


def load_model(workdir: str | pathlib.Path, mesh: Mesh | None = None) -> Model:
  """The trained model of `workdir` (see find_run), ready to predict."""
  run_dir = find_run(workdir)
  return _build_model(run_dir, _read_json(run_dir / 'config.json'),
                      _read_json(run_dir / 'data.json'), mesh)


def choose_batch_size(requested: int | None, default: int, num_inputs: int, mesh: Mesh) -> int:
  """`requested` (checked), else `default` rounded up to a multiple of the device count."""
  num_devices = mesh.devices.size
  if requested is not None:
    try:
      if requested <= 0:
        raise ValueError(f'--batch_size={requested} must be positive.')
      sharding.check_batch_size(requested, mesh, '--batch_size')
    except ValueError as error:
      raise PredictError(str(error)) from None
    batch_size = requested
  else:
    batch_size = -(-default // num_devices) * num_devices
  # A handful of inputs needs no full batch of padding.
  return min(batch_size, max(num_devices, -(-num_inputs // num_devices) * num_devices))


@dataclasses.dataclass(frozen=True)
class Predictions:
  inputs: list[str]
  probabilities: np.ndarray  # [n, classes] float32; NaN rows where status is an error
  status: list[str]  # 'ok' or the error, naming the input

  @property
  def predicted_index(self) -> np.ndarray:
    """Argmax per input; -1 where the input could not be read."""
    ok = np.asarray([s == 'ok' for s in self.status], bool)
    return np.where(ok, np.argmax(np.nan_to_num(self.probabilities, nan=-1.0), axis=1), -1)


def _read_or_error(read, index: int) -> np.ndarray | str:
  try:
    return read(index)
  except DataError as error:
    return str(error)


def _decoded_batches(inputs: Inputs, batch_size: int, pool):
  """(first index, images or error messages) per batch; the next batch decodes meanwhile."""
  count = len(inputs.names)
  submit = lambda first: [pool.submit(_read_or_error, inputs.read, i)
                          for i in range(first, min(first + batch_size, count))]
  pending = submit(0)
  for first in range(0, count, batch_size):
    current, pending = pending, submit(first + batch_size)
    yield first, [future.result() for future in current]


def run(model: Model, inputs: Inputs, batch_size: int | None = None) -> Predictions:
  """Probabilities of every input, one batch on the devices at a time."""
  batch_size = choose_batch_size(batch_size, model.eval_batch_size, len(inputs.names), model.mesh)
  probabilities = np.full((len(inputs.names), len(model.class_names)), np.nan, np.float32)
  status = ['ok'] * len(inputs.names)
  workers = min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool, tqdm(
      total=len(inputs.names), desc='predicting', unit='img', dynamic_ncols=True) as progress:
    for first, results in _decoded_batches(inputs, batch_size, pool):
      good = [first + j for j, result in enumerate(results) if not isinstance(result, str)]
      for j, result in enumerate(results):
        if isinstance(result, str):
          status[first + j] = result
      if good:
        images = np.stack([results[i - first] for i in good])
        probabilities[good] = model.predict_batch(images, batch_size)
      progress.update(len(results))
  return Predictions(list(inputs.names), probabilities, status)


def write_predictions(path: str | pathlib.Path, predictions: Predictions,
                      class_names, labels: list[str] | None = None) -> pathlib.Path:
  """The CSV, written atomically; failed inputs keep their row with empty probabilities.
  With `labels` (a CSV input's label column), a `label` column follows the input."""
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator='\n')
  given = [] if labels is None else ['label']
  writer.writerow(['input', *given, 'predicted_class', 'predicted_index',
                   *(f'p_{name}' for name in class_names), 'status'])
  for i, (name, row, index, status) in enumerate(zip(
      predictions.inputs, predictions.probabilities, predictions.predicted_index,
      predictions.status)):
    label = [] if labels is None else [labels[i]]
    if status == 'ok':
      writer.writerow([name, *label, class_names[index], int(index),
                       *(f'{p:.6g}' for p in row), status])
    else:
      writer.writerow([name, *label, '', '', *([''] * len(class_names)), status])
  return atomic.write_text(path, buffer.getvalue())


def check_labels(labels: list[str] | None, class_names, input_path) -> None:
  """PredictError for labels that are not the model's classes ('' is no label)."""
  if labels is None:
    return
  unknown = sorted({label for label in labels if label and label not in class_names})
  if unknown:
    raise PredictError(f'--input={input_path}: label(s) {unknown[:5]} are not classes of the '
                       f'model ({list(class_names)}); write them as the model names its '
                       'classes, or leave the cell empty for an unlabelled image.')


def labelled_summary(labels: list[str], predictions: Predictions, class_names) -> str | None:
  """Accuracy and balanced accuracy over the inputs with a label that were read."""
  index = {name: i for i, name in enumerate(class_names)}
  pairs = [(index[label], guess) for label, guess, status in zip(
      labels, predictions.predicted_index, predictions.status) if label and status == 'ok']
  if not pairs:
    return None
  truth, guess = (np.asarray(column) for column in zip(*pairs))
  recalls = [np.mean(guess[truth == c] == c) for c in np.unique(truth)]
  accuracy = 100 * np.mean(truth == guess)
  return (f'On the {len(pairs)} labelled input(s) read: accuracy {accuracy:.1f}%, '
          f'balanced accuracy {100 * np.mean(recalls):.1f}% (mean recall of the '
          f'{len(recalls)} class(es) present).')


def predict(workdir: str | pathlib.Path, input_path: str | pathlib.Path,
            output: str | pathlib.Path | None = None, batch_size: int | None = None,
            mesh: Mesh | None = None) -> tuple[Predictions, pathlib.Path, Model]:
  """The command: finds the model, predicts every input, writes the CSV, prints a summary."""
  keep_earlier = not output  # the default file is kept, as predictions.N.csv, not replaced
  output = pathlib.Path(output) if output else pathlib.Path(workdir) / 'predictions.csv'
  run_dir = find_run(workdir)
  config, data = _read_json(run_dir / 'config.json'), _read_json(run_dir / 'data.json')
  # Inputs and output are checked before anything is restored or compiled.
  inputs = read_inputs(input_path, data['image_shape'],
                       config.get('bit_depth') or imagefiles.DEFAULT_BIT_DEPTH)
  check_labels(inputs.labels, data['class_names'], input_path)
  if output.is_dir():
    raise PredictError(f'--output={output} is a directory; name a .csv file.')
  blocking = next((p for p in output.parents if p.exists() and not p.is_dir()), None)
  if blocking is not None:
    raise PredictError(f'--output={output}: {blocking} is a file, not a directory; name a .csv '
                       'file in a directory.')
  mesh = mesh or sharding.make_mesh()
  batch_size = choose_batch_size(batch_size, _eval_batch_size(config), len(inputs.names), mesh)
  model = _build_model(run_dir, config, data, mesh)
  selection = model.selection
  print(f'Model: {run_dir} ({model.stage}, selected at step {selection.get("step")} on '
        f'validation {selection.get("metric")} {selection.get("score", float("nan")):.4f}).')
  if not is_finished(run_dir):
    print(f'note: {run_dir} has not finished training (no report.json): predicting with the '
          'best model it selected so far. Rerun its training command to finish it.')
  for note in inputs.notes:
    print(f'note: {note}')
  predictions = run(model, inputs, batch_size)
  kept = workdir_lib.keep_previous(output) if keep_earlier else None
  if kept is not None:
    print(f'note: the earlier {output.name} is kept as {kept.name}.')
  path = write_predictions(output, predictions, model.class_names, inputs.labels)
  failures = [s for s in predictions.status if s != 'ok']
  print(f'Predicted {len(predictions.status) - len(failures)} of {len(predictions.status)} '
        f'input(s); {len(failures)} failed (their error is in the status column).')
  for message in failures[:10]:
    print(f'  failed: {message}')
  if len(failures) > 10:
    print(f'  ... and {len(failures) - 10} more')
  summary = inputs.labels and labelled_summary(inputs.labels, predictions, model.class_names)
  if summary:
    print(summary)
  print(f'Written: {path}')
  return predictions, path, model


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs several INFO lines per restore
  try:
    predict(FLAGS.workdir, FLAGS.input, FLAGS.output, FLAGS.batch_size)
  except PredictError as error:
    print(f'imbal_jax.predict: {error}', file=sys.stderr)
    sys.exit(2)


def define_flags() -> None:
  # Defined only when run as a command: imbal_jax.prepare and imbal_jax.report define
  # --output too, and tests import several command modules into one process.
  flags.DEFINE_string('workdir', None, 'A run directory, or a folder with stage1/ and stage2/.')
  flags.DEFINE_string('input', None, 'A folder of images, a .npz, a CSV with a path column, or '
                      'an image file.')
  flags.DEFINE_string('output', None, 'The CSV to write; default: WORKDIR/predictions.csv.')
  flags.DEFINE_integer('batch_size', None, 'Global batch, a multiple of the device count; '
                       'default: the run\'s eval_batch_size.')
  flags.mark_flags_as_required(['workdir', 'input'])


if __name__ == '__main__':
  define_flags()
  app.run(main)
