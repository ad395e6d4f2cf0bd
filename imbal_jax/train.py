"""train_and_evaluate(config, workdir): the one loop behind both stages.

Stage 1 trains encoder + classifier + projection head with CE + lambda *
SupCon. Stage 2 restores the stage-1 encoder selected on validation, freezes
it, and trains a freshly initialised linear head with class-balanced
sampling (or another classifier, config.stage2_method; the closed-form ones
are fitted once, with no training steps). Both stages evaluate on the
validation split as they go, keep the best validation checkpoint, and
evaluate the test split once, at the end, with that checkpoint.
"""

from __future__ import annotations

import contextlib
import pathlib
import platform
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

import imbal_jax
from imbal_jax import (checkpoint, classifiers, configuration, cpu_conv, metrics, reporting,
                       sharding, stages, steps)
from imbal_jax import workdir as workdir_lib
from imbal_jax.data import pipeline, sources
from imbal_jax.run_data import describe_data, load_dataset, stage1_pixel_stats

SELECTION_METRIC = 'balanced_accuracy'


def evaluate(eval_fn, variables, split: sources.Split, batch_size: int, mesh) -> np.ndarray:
  """Class probabilities for every example of `split`, in order (padding removed)."""
  # One batch in flight at a time: many independent collective programs queued at
  # once can starve each other of threads on the CPU backend (its rendezvous then
  # aborts the process). The outputs are replicated, so every process holds them
  # whole; padding sits at the end of the last global batch.
  outputs = [np.asarray(jax.device_get(eval_fn(variables, sharding.put_global_batch(batch, mesh))))
             for batch in pipeline.eval_batches(split, batch_size)]
  return np.concatenate(outputs)[:len(split)]


# What --force cannot change in an existing run: the data and its split (saved in
# data.json and reused), the seed that drew the long-tail subsample, and what decides
# the shapes of the saved state.
FIXED_FIELDS = configuration.INHERITED_FIELDS + ('stage', 'seed', 'stage2_method')


def stage2_preset_note(config, stage1_config: dict) -> str | None:
  """A note where stage 2 starts from another preset than its stage 1 did: the
  data and encoder are inherited either way, but the head's recipe (batch size,
  augmentation, epochs) is its own preset's."""
  mine, theirs = config.get('preset'), stage1_config.get('preset')
  if not mine or not theirs or mine == theirs:
    return None
  return (f"stage 2 takes its training settings from preset {mine!r} (batch size, "
          f"augmentation, epochs), while its stage 1 was trained with preset {theirs!r}; "
          f"--config=configs/stage2.py:{theirs} gives stage 2 that preset's settings.")


def _environment(dtype: str = 'float32') -> dict[str, Any]:
  import flax
  return {
      'imbal_jax': imbal_jax.__version__, 'jax': jax.__version__, 'flax': flax.__version__,
      'optax': optax.__version__, 'python': platform.python_version(),
      'device_kind': jax.devices()[0].device_kind, 'device_count': jax.device_count(),
      'process_count': jax.process_count(),
      # 'onednn' or 'xla': which computed a CPU run's convolutions (imbal_jax.cpu_conv);
      # the two agree to float32 rounding, not bit for bit.
      'cpu_convolutions': cpu_conv.backend(dtype),
  }


def frequency_groups(config):
  """config.frequency_groups -> metrics.summarize's `groups`: 'terciles', 'oltr' or 'HIGH,LOW'."""
  spec = config.frequency_groups
  if spec == 'terciles':
    return spec
  if spec == 'oltr':
    return metrics.OLTR_THRESHOLDS
  high, low = (float(x) for x in spec.split(','))
  return high, low


def _is_log_step(step: int, config, total_steps: int) -> bool:
  return step == 1 or step % config.log_every_steps == 0 or step == total_steps


@contextlib.contextmanager
def _closing_on_error(ckpt, progress, data_iterator):
  """Closes the progress bar, the input pipeline and the checkpoint managers if the
  loop fails, so the error is the last thing printed and background threads and
  worker processes stop with the run."""
  try:
    yield
  except BaseException:
    progress.close()
    data_iterator.close()
    try:
      ckpt.close()
    except Exception:  # the original error is the one to report
      pass
    raise


def _check_finite(state, measurements, config, ckpt, workdir, done, baseline: int) -> int:
  """Stops on a refused (non-finite) update unless config.skip_nonfinite; returns the count.

  Called at log steps and before every save, so that no checkpoint holds an update
  refused in this run (a resumed run would otherwise carry it on unnoticed).
  `baseline` is the count the run started with (updates skipped earlier with
  skip_nonfinite=True, in a run since continued with --force).
  """
  count = int(state.nonfinite_steps)
  if count > baseline and not config.skip_nonfinite:
    measurements = {k: float(v) for k, v in jax.device_get(measurements).items()}
    terms = ', '.join(f'{k}={v:.4g}' for k, v in measurements.items())
    last_good = (f'step {ckpt.latest_step} in {workdir / "checkpoints"}'
                 if ckpt.latest_step is not None else 'none yet')
    where = (f'at step {int(state.first_nonfinite_step)}' if baseline == 0
             else f'in {count - baseline} step(s) of this run')
    raise FloatingPointError(
        f'non-finite loss or gradients {where} (seen at step {done}; terms at that step: '
        f'{terms}). The update was not applied. '
        f'Last good checkpoint: {last_good}. Lower '
        'config.learning_rate, check the data, or set config.skip_nonfinite=True to skip '
        'such updates and count them.')
  return count


class _NoBatches:
  """The data iterator of a run with no training steps."""

  def __next__(self):
    raise StopIteration

  def close(self):
    pass


def _fit_closed_form(stage: stages.Stage, ckpt, dataset: sources.Dataset, data_info,
                     config) -> steps.TrainState:
  """Fits a closed-form stage-2 classifier (tau-norm, NCM, post-hoc logit adjustment),
  choosing its settings on validation by SELECTION_METRIC, and saves it as the selected
  model: the loop then runs no training steps."""
  val = dataset.splits['val']
  groups = frequency_groups(config)

  def score(probabilities):
    return metrics.summarize(val.labels, probabilities, dataset.class_names,
                             data_info['counts']['train'], groups)[SELECTION_METRIC]

  state, best_score = stage.fit(score)
  # A rerun (e.g. --force with another tau grid) fits again: its fit replaces the saved one,
  # so that the report's settings and the model it evaluates agree.
  ckpt.save_best(0, stage.eval_variables(state), {'step': 0, 'epoch': 0, 'split': 'val',
                                                  'metric': SELECTION_METRIC,
                                                  'score': best_score}, replace=True)
  return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       force: bool = False) -> dict[str, Any]:
  """Trains the stage named by `config.stage` in `workdir`; returns the report.

  `force` continues a workdir whose saved config differs from `config`.
  """
  config = configuration.resolve(config)
  workdir = pathlib.Path(workdir)
  mesh = sharding.make_mesh()
  for field in ('batch_size', 'eval_batch_size'):
    try:
      sharding.check_batch_size(config[field], mesh, f'config.{field}')
    except ValueError as error:
      raise configuration.ConfigError(str(error)) from None
  workdir_lib.check_usable(workdir)
  workdir_lib.check_config(workdir, config.to_dict(), force,
                           configuration.default_config(config.stage), FIXED_FIELDS)
  is_writer = jax.process_index() == 0

  dataset = load_dataset(config, workdir)
  data_info = describe_data(dataset, config.seed, stage1_pixel_stats(config))
  if is_writer:
    counts = ', '.join(f'{n}: {c}' for n, c in zip(dataset.class_names, data_info['counts']['train']))
    print(f'{dataset.name}: {data_info["sizes"]} images per split; training images per class: '
          f'{counts}')
    for note in dataset.notes:
      print(f'note: {note}')
    if (config.stage == 'stage2' and config.stage2_method not in classifiers.TRAINED_METHODS
        and (config.cache_features or config.feature_views > 1)):
      print(f'note: config.cache_features and config.feature_views apply to the trained heads '
            f'({", ".join(classifiers.TRAINED_METHODS)}); {config.stage2_method} computes the '
            'frozen features it needs once either way, from images without augmentation.')
  batches = pipeline.TrainBatches(dataset.splits['train'], dataset.num_classes,
                                  config.batch_size, config.sampler, config.seed,
                                  config.num_epochs, pairs=config.batch_pairs)
  build = stages.build_stage1 if config.stage == 'stage1' else stages.build_stage2
  stage = build(config, dataset, data_info, mesh, batches.steps_per_epoch)
  stage1_record = None
  if config.stage == 'stage2':
    stage1_record = workdir_lib.check_stage1_unchanged(
        workdir, pathlib.Path(config.init_from),
        {'step': stage.extra_report['stage1_selected_step'],
         'score': stage.extra_report.get('stage1_selected_score'),
         'variables_sha256': stage.extra_report['stage1_variables_sha256']})

  if is_writer and config.stage == 'stage2':
    note = stage2_preset_note(config, stage.extra_report['stage1_config'])
    if note:
      print(f'note: {note}')
  if is_writer:
    workdir.mkdir(parents=True, exist_ok=True)
    reporting.write_json(workdir / 'config.json', config.to_dict())
    reporting.write_json(workdir / 'data.json', data_info)
    if stage1_record is not None and not (workdir / workdir_lib.STAGE1_RECORD).is_file():
      reporting.write_json(workdir / workdir_lib.STAGE1_RECORD, stage1_record)
  ckpt = checkpoint.Checkpoints(workdir)
  state = stage.state
  if stage.fit is not None:
    state = _fit_closed_form(stage, ckpt, dataset, data_info, config)
  bookkeeping = {'best_score': -1.0, 'best_step': -1}
  if ckpt.latest_step is not None:
    try:
      state, bookkeeping = ckpt.restore_state(state)
    except checkpoint.CheckpointError:
      ckpt.close()
      raise
    if is_writer:
      print(f'Resuming {config.stage} from step {int(state.step)} ({workdir / "checkpoints"}).')
    if ckpt.discard_best_after(int(state.step)):
      # The selection restarts from here: the steps up to the checkpoint scored below
      # the discarded model (it was the best when saved), so a rerun with the same
      # config selects what an uninterrupted run would have.
      bookkeeping = {'best_score': -1.0, 'best_step': -1}
  start_step = int(state.step)
  nonfinite_at_start = int(state.nonfinite_steps)
  if stage.train_step is None:  # a closed-form stage 2: no steps, so no pipeline or workers
    data_iterator = _NoBatches()
  else:
    data_iterator = pipeline.train_iterator(
        stage.batch_source(batches) if stage.batch_source else batches, config.data_workers,
        start_step)
  if is_writer:
    for log in ('metrics.jsonl', 'val_metrics.jsonl'):
      workdir_lib.truncate_log(workdir / log, start_step)

  eval_fn = steps.jit_eval_step(stage.logits_fn, mesh, stages.pixel_stats(data_info))
  rng = jax.random.key(config.seed + 1)
  metrics_log = reporting.MetricsLog(workdir / 'metrics.jsonl')
  val_log = reporting.MetricsLog(workdir / 'val_metrics.jsonl')
  groups = frequency_groups(config)
  total_steps = batches.total_steps if stage.train_step else 0
  # The loop writes from step start_step + 1: the interrupted run's points up to the
  # checkpoint's step stay (as in metrics.jsonl), later ones are hidden.
  curves = reporting.ScalarWriter(workdir / 'tensorboard',
                                  purge_step=start_step + 1 if start_step else None) \
      if is_writer else None
  progress = tqdm(total=total_steps, initial=start_step, desc=config.stage, unit='step',
                  disable=not is_writer or not total_steps, dynamic_ncols=True)
  last_log_time, last_log_step = time.perf_counter(), start_step
  with workdir_lib.StopRequest() as stop, _closing_on_error(ckpt, progress, data_iterator):
    for step in range(start_step, total_steps):
      batch = sharding.put_global_batch(next(data_iterator), mesh)
      state, measurements = stage.train_step(state, batch, rng)
      done = step + 1
      progress.update(1)
      logged = _is_log_step(done, config, total_steps)
      if logged:
        measurements = {k: float(v) for k, v in jax.device_get(measurements).items()}
        skipped = _check_finite(state, measurements, config, ckpt, workdir, done,
                                nonfinite_at_start)
        now = time.perf_counter()
        images_per_sec = (done - last_log_step) * config.batch_size / (now - last_log_time)
        last_log_time, last_log_step = now, done
        record = {'step': done, 'epoch': done / batches.steps_per_epoch, **measurements,
                  'images_per_sec': images_per_sec}
        if config.skip_nonfinite:
          record['skipped_nonfinite_steps'] = skipped
        if is_writer:
          metrics_log.write(record)
          curves.write(done, {f'train/{k}': v for k, v in record.items() if k != 'step'})
        progress.set_postfix(loss=f"{measurements['loss']:.3f}", img_s=f'{images_per_sec:.0f}')
      epoch_done = done % batches.steps_per_epoch == 0
      epoch = done // batches.steps_per_epoch
      # Before evaluating and saving (a log step has just checked).
      if epoch_done and not logged and not config.skip_nonfinite:
        _check_finite(state, measurements, config, ckpt, workdir, done, nonfinite_at_start)
      if epoch_done and (epoch % config.eval_every_epochs == 0 or done == total_steps):
        probabilities = evaluate(eval_fn, stage.eval_variables(state), dataset.splits['val'],
                                 config.eval_batch_size, mesh)
        val = metrics.summarize(dataset.splits['val'].labels, probabilities,
                                dataset.class_names, data_info['counts']['train'], groups)
        if is_writer:
          summary = {k: val[k] for k in ('accuracy', 'balanced_accuracy', 'macro_f1')}
          val_log.write({'step': done, 'epoch': epoch,
                         **{f'val_{k}': v for k, v in summary.items()}})
          curves.write(done, {f'val/{k}': v for k, v in summary.items() if v is not None})
        if val[SELECTION_METRIC] > bookkeeping['best_score']:
          bookkeeping = {'best_score': val[SELECTION_METRIC], 'best_step': done}
          ckpt.save_best(done, stage.eval_variables(state),
                         {'step': done, 'epoch': epoch, 'split': 'val',
                          'metric': SELECTION_METRIC, 'score': val[SELECTION_METRIC]})
      stopping = stop.reached(done)
      if epoch_done and (epoch % config.checkpoint_every_epochs == 0 or done == total_steps):
        ckpt.save_state(done, state, bookkeeping)
      elif stopping:
        if not logged and not config.skip_nonfinite:
          _check_finite(state, measurements, config, ckpt, workdir, done, nonfinite_at_start)
        ckpt.save_state(done, state, bookkeeping)
      if stopping and done < total_steps:
        progress.close()
        ckpt.wait()
        ckpt.close()
        raise workdir_lib.Preempted(done, workdir, stop.signal_name)
      if epoch_done:  # Throughput counts training steps only, not evaluation or saving.
        last_log_time, last_log_step = time.perf_counter(), done
  progress.close()
  data_iterator.close()  # stops grain's worker processes, if any
  if curves is not None:
    curves.close()
  ckpt.wait()

  variables, selected = ckpt.restore_best(stage.eval_variables(state))
  ckpt.close()
  if stage.fit is None and selected['step'] != bookkeeping['best_step']:
    raise checkpoint.CheckpointError(
        f'{workdir / "best"} holds the model of step {selected["step"]}, but this run selected '
        f'step {bookkeeping["best_step"]}; start the stage again in a fresh --workdir.')
  report = {
      'stage': config.stage,
      'dataset': dataset.name,
      'class_names': list(dataset.class_names),
      'train_counts': data_info['counts']['train'],
      'split_sizes': data_info['sizes'],
      'data_notes': data_info['notes'],
      'selection': selected,
      **stage.extra_report,
  }
  calibration, predictions = {}, {}
  for split in ('val', 'test'):
    probabilities = evaluate(eval_fn, variables, dataset.splits[split], config.eval_batch_size,
                             mesh)
    labels = dataset.splits[split].labels
    report[split] = metrics.summarize(labels, probabilities, dataset.class_names,
                                      data_info['counts']['train'], groups)
    calibration[split] = metrics.calibration_bins(labels, probabilities)
    predictions[split] = reporting.SplitPredictions(
        labels, probabilities, dataset.spec[split]['part'],
        np.asarray(dataset.spec[split]['rows']), dataset.paths.get(split))
  report['config'] = config.to_dict()
  report['environment'] = _environment(config.get('dtype', 'float32'))
  if is_writer:
    previous = workdir_lib.keep_previous_report(workdir)
    if previous is not None:
      print(f'The earlier report was kept as {previous}.')
    reporting.write_json(workdir / 'report.json', report)
    written = reporting.write_run_outputs(workdir, report, calibration, predictions)
    print(reporting.format_report(report))
    print(f'\nReport written to {workdir / "report.json"}; also '
          f'{", ".join(p.name for p in written)}.')
  return report

