"""Time the jitted training steps, and the host input pipeline, of a config preset.

  python -m imbal_jax.benchmark --config=configs/stage1.py:ham10000 --steps=20

Both steps run on random uint8 images of the preset's shape, so no data set is
needed; when the preset's data is present the input pipeline is also timed on
its training split. Prints one JSON line per stage ('stage1', 'stage2',
'input_pipeline'): compile time, median and 90th-percentile step time, images/s,
the FLOPs of the step's convolutions and matrix products (flops.matmul_flops)
and, on accelerators whose peak is known, the model FLOP utilisation (MFU). Any
config field can be overridden, e.g. --config.model=resnet50 --config.batch_size=64;
--stages=stage1 times the stage-1 step alone.

The steps are built as train.py builds them (same optimizer, partial-bound
arguments, shardings, donation); the stage-2 step runs on a randomly
initialised frozen encoder, which costs the same as a trained one.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from imbal_jax import (configuration, cpu_conv, distributed, host_memory, launch_flags, sharding,
                       stages)
from imbal_jax import steps as steps_lib
from imbal_jax.data import pipeline, sources
from imbal_jax.flops import matmul_flops, peak_flops
from imbal_jax.profiling import CPU_TRACE_FLAG, PROFILE_STEPS, profile_compiled
from imbal_jax.models import (ARCHITECTURES, LinearHead, Stage1Net, encoder_variables,
                              make_encoder)

STAGES = ('stage1', 'stage2')
# What run() can time: the two steps and the host input pipeline, in this order.
RECORDS = STAGES + ('input_pipeline',)
DTYPES = ('float32', 'bfloat16', 'float16')
# The optimizer schedule needs a length; it does not change the step's cost.
_NOMINAL_STEPS_PER_EPOCH = 100
# Random images are normalised with these (the real statistics do not change the cost).
_PIXEL_MEAN, _PIXEL_STD = 0.5, 0.25

# (height = width, channels) as each reader stores images when config.image_size is 0.
_STORED_SHAPES = {'digits': (8, 1), 'medmnist': (28, 3), 'idx': (28, 1), 'tfds': (32, 3)}
# Readers that decode image files (and caches of them) need config.image_size; always RGB.
_IMAGE_FILE_READERS = ('folder', 'csv', 'isic', 'prepared')
# Of those, the ones that decode every file when the data is loaded.
_DECODING_READERS = sources.RESIZING_READERS

class BenchmarkError(ValueError):
  """A request the benchmark cannot run; the message says what to change."""


def image_shape(config, image_size: int | None = None) -> tuple[int, int, int]:
  """(size, size, channels) of the preset's images: `image_size`, config.image_size or stored."""
  if config.dataset in _IMAGE_FILE_READERS:
    stored_size, channels = 0, 3
  elif config.dataset in _STORED_SHAPES:
    stored_size, channels = _STORED_SHAPES[config.dataset]
  else:
    raise BenchmarkError(f'config.dataset={config.dataset!r} has no known image shape.')
  size = image_size or config.image_size or stored_size
  if not size:
    raise BenchmarkError(f'config.dataset={config.dataset!r} is decoded at config.image_size, '
                         'which is 0: pass --image_size or --config.image_size.')
  return size, size, channels


def compute_dtype(config, dtype: str | None = None) -> str:
  dtype = dtype or config.get('dtype', None) or 'float32'
  if dtype not in DTYPES:
    raise BenchmarkError(f'dtype {dtype!r} is not one of {DTYPES}.')
  return dtype


def environment(config, dtype: str) -> dict[str, Any]:
  """The fields every record shares: hardware and what was timed."""
  return {
      'device_kind': jax.devices()[0].device_kind,
      'device_count': jax.device_count(),
      'process_count': jax.process_count(),
      'model': config.model,
      'width': config.width or ARCHITECTURES[config.model][2],
      'dtype': dtype,
      # CPU: whether freed host buffers stayed mapped (imbal_jax.host_memory).
      'host_memory_retained': host_memory.retained(),
      # CPU: 'onednn' or 'xla', which computed the convolutions (imbal_jax.cpu_conv).
      'cpu_convolutions': cpu_conv.backend(dtype),
  }


@functools.lru_cache
def _variables_initializer(mesh):
  # One compiled initializer per (model, image shape) serves both stages: a large
  # model's init can take as long to compile as its train step.
  def init(rng, *, model, shape):
    return model.init(rng, jnp.zeros((1,) + shape, jnp.float32), train=False)

  return jax.jit(init, static_argnames=('model', 'shape'),
                 out_shardings=sharding.replicated(mesh))


def build_step(stage: str, config, shape: tuple[int, int, int], num_classes: int, mesh,
               dtype: str = 'float32'):
  """(jitted step, its arguments): train.py's step for `stage` and a random global batch."""
  if stage not in STAGES:
    raise BenchmarkError(f'stage {stage!r} is not one of {STAGES}.')
  encoder = make_encoder(config.model, config.width, shape[0], dtype)
  model = Stage1Net(encoder=encoder, num_classes=num_classes,
                    projection_dim=config.projection_dim, dtype=jnp.dtype(dtype))
  tx, learning_rate_fn = stages.make_optimizer(config, _NOMINAL_STEPS_PER_EPOCH)
  channels = shape[-1]
  data_info = {'pixel_mean': [_PIXEL_MEAN] * channels, 'pixel_std': [_PIXEL_STD] * channels,
               'counts': {'train': [1] * num_classes}}
  preprocess_kwargs = stages.preprocess_kwargs(config)
  pixel_stats = stages.pixel_stats(data_info)
  replicated = sharding.replicated(mesh)
  rng = jax.device_put(jax.random.key(config.seed), replicated)
  variables = _variables_initializer(mesh)(rng, model=model, shape=shape)

  if stage == 'stage1':
    state = jax.jit(lambda v, r: stages.stage1_state(v, tx, r, num_classes, config.projection_dim),
                    out_shardings=replicated)(variables, rng)
    step_fn = stages.stage1_step_fn(config, model, data_info, _NOMINAL_STEPS_PER_EPOCH,
                                   learning_rate_fn)
    step, extra_args = stages.jit_train_step(step_fn, mesh, pixel_stats=pixel_stats), ()
  else:
    frozen = encoder_variables(variables['params'], variables['batch_stats'])
    head = LinearHead(num_classes)
    features = jax.eval_shape(lambda v: encoder.apply(v, jnp.zeros((1,) + shape), train=False),
                              frozen)

    def init(rng):
      params = head.init(rng, jnp.zeros(features.shape, features.dtype))['params']
      return steps_lib.TrainState.create(apply_fn=head.apply, params=params, batch_stats={}, tx=tx)

    state = jax.jit(init, out_shardings=replicated)(rng)
    step_fn = functools.partial(steps_lib.stage2_step, encoder=encoder, head=head,
                                learning_rate_fn=learning_rate_fn, **preprocess_kwargs)
    step, extra_args = stages.jit_train_step(step_fn, mesh, num_extra_args=1,
                                             pixel_stats=pixel_stats), (frozen,)

  # This process's rows of the global batch, as train.py's input pipeline delivers them.
  local_batch = config.batch_size // jax.process_count()
  host_rng = np.random.default_rng(config.seed + jax.process_index())
  batch = sharding.put_global_batch({
      'image': host_rng.integers(0, 256, (local_batch,) + shape, dtype=np.uint8),
      'label': host_rng.integers(0, num_classes, local_batch, dtype=np.int32)}, mesh)
  step_rng = jax.device_put(jax.random.key(config.seed + 1), replicated)
  # The jitted function itself (for lower()), and every argument, the pixel statistics last.
  return step.fn, (state, batch, step_rng) + extra_args + step.trailing


def _time_compiled(compiled, args, steps: int, warmup: int) -> tuple[list[float], Any]:
  """Seconds of each of `steps` synchronised steps after `warmup` untimed ones; the last state."""
  state, rest = args[0], args[1:]
  times = []
  for index in range(warmup + steps):
    start = time.perf_counter()
    state, measurements = compiled(state, *rest)  # the old state is donated
    # One executable's outputs become ready together, so the measurements suffice.
    jax.block_until_ready(measurements)
    if index >= warmup:
      times.append(time.perf_counter() - start)
  return times, state


def model_flops(stage: str, config, shape, num_classes: int, mesh, dtype: str,
                traced) -> tuple[float, float]:
  """(model FLOPs, executed FLOPs) of the global step whose trace is `traced`.

  They differ under gradient accumulation: its gradient cache runs each
  micro-batch's forward pass twice (steps.cached_stage1_gradients). The model FLOPs,
  what MFU is defined over, are those of the same step on the whole batch at once.
  """
  executed = matmul_flops(traced.jaxpr.jaxpr)
  if stage != 'stage1' or config.grad_accum_steps == 1:
    return executed, executed
  whole_batch = config.copy_and_resolve_references()
  whole_batch.grad_accum_steps = 1
  jitted, args = build_step(stage, whole_batch, shape, num_classes, mesh, dtype)
  return matmul_flops(jitted.trace(*args).jaxpr.jaxpr), executed


def benchmark_step(stage: str, config, *, image_size: int | None = None, num_classes: int = 10,
                   steps: int = 20, warmup: int = 3, dtype: str | None = None,
                   mesh=None, profile_dir: str | None = None,
                   shape: tuple[int, int, int] | None = None) -> dict[str, Any]:
  """Compiles and times `stage`'s train step on random data; one JSON-ready record.

  `shape` (height, width, channels) overrides the preset's image shape (image_shape).
  With `profile_dir`, PROFILE_STEPS more steps are traced into profile_dir/stage
  after the timed ones, and the record's 'profile' holds profile_compiled's summary.
  """
  if steps < 1 or warmup < 0:
    raise BenchmarkError(f'need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}.')
  mesh = sharding.make_mesh() if mesh is None else mesh
  try:
    sharding.check_batch_size(config.batch_size, mesh)
  except ValueError as error:
    raise BenchmarkError(str(error)) from None
  dtype = compute_dtype(config, dtype)
  shape = tuple(shape) if shape is not None else image_shape(config, image_size)
  jitted, args = build_step(stage, config, shape, num_classes, mesh, dtype)
  start = time.perf_counter()
  traced = jitted.trace(*args)
  compiled = traced.lower().compile()  # what the first call would spend
  compile_seconds = time.perf_counter() - start
  times, state = _time_compiled(compiled, args, steps, warmup)

  median = float(np.median(times))
  record = {'stage': stage, **environment(config, dtype), 'image_size': shape[0],
            'channels': shape[2], 'global_batch': config.batch_size,
            'compile_seconds': compile_seconds, 'step_seconds_median': median,
            'step_seconds_p90': float(np.percentile(times, 90)),
            'images_per_sec': config.batch_size / median}
  # FLOPs of the global step (all devices), against the peak of all devices.
  flops, executed = model_flops(stage, config, shape, num_classes, mesh, dtype, traced)
  peak = peak_flops(record['device_kind'], dtype)
  peak = None if peak is None else peak * mesh.devices.size
  achieved = flops / median
  record.update(flops_per_step=flops, achieved_flops_per_sec=achieved, peak_flops_per_sec=peak,
                mfu=None if peak is None else achieved / peak,
                grad_accum_steps=config.grad_accum_steps if stage == 'stage1' else 1,
                executed_flops_per_step=executed)
  if profile_dir is not None:
    record['profile'] = profile_compiled(compiled, (state,) + args[1:],
                                         os.path.join(profile_dir, stage))
  return record


def load_data(config) -> tuple[sources.Dataset | None, str | None]:
  """(the preset's data set, None), or (None, why it cannot be loaded)."""
  try:
    return sources.load(config), None
  except sources.DataError as error:
    return None, str(error)


def time_input_pipeline(config, *, steps: int = 20, warmup: int = 3,
                        dtype: str | None = None, data=None) -> dict[str, Any]:
  """Times pipeline.train_iterator over the real training split alone (no device work).

  Skipped, with a 'note', when the data cannot be loaded. images_per_sec counts
  this process's rows of each global batch: what one host's pipeline delivers.
  `data` is load_data's result where the caller has it.
  """
  record = {'stage': 'input_pipeline', **environment(config, compute_dtype(config, dtype)),
            'global_batch': config.batch_size, 'data_workers': config.data_workers}
  dataset, missing = load_data(config) if data is None else data
  if dataset is None:
    return {**record, 'skipped': True, 'note': f'data not available: {missing}',
            'images_per_sec': None}
  train_split = dataset.splits['train']
  steps_per_epoch = math.ceil(len(train_split) / config.batch_size)
  num_epochs = math.ceil((warmup + steps) / steps_per_epoch)
  batches = pipeline.TrainBatches(train_split, dataset.num_classes, config.batch_size,
                                  config.sampler, config.seed, num_epochs,
                                  pairs=config.batch_pairs)
  iterator = pipeline.train_iterator(batches, config.data_workers)
  for _ in range(warmup):
    next(iterator)
  times, images = [], 0
  for _ in range(steps):
    start = time.perf_counter()
    images += len(next(iterator)['label'])
    times.append(time.perf_counter() - start)
  iterator.close()  # stops grain's worker processes, if any
  height, width, channels = dataset.image_shape
  record.update(skipped=False, dataset=dataset.name, train_images=len(train_split),
                image_size=height, channels=channels,
                batch_seconds_median=float(np.median(times)),
                images_per_sec=images / sum(times))
  return record


def run(config, *, steps: int = 20, warmup: int = 3, image_size: int | None = None,
        num_classes: int = 10, dtype: str | None = None,
        profile_dir: str | None = None,
        stages: Sequence[str] = RECORDS) -> list[dict[str, Any]]:
  """One record per entry of `stages` (RECORDS: the stage-1 step, the stage-2 step,
  the input pipeline), in RECORDS' order."""
  unknown = [stage for stage in stages if stage not in RECORDS]
  if unknown or not stages:
    raise BenchmarkError(f'--stages={",".join(stages)!r}: choose one or more of '
                         f'{",".join(RECORDS)}, comma-separated.')
  if config.stage != 'stage1':
    raise BenchmarkError('pass a stage-1 config (configs/stage1.py[:PRESET]): a stage-2 config '
                         'inherits its model and data from a stage-1 run; both steps are timed '
                         'from the stage-1 config.')
  config = configuration.resolve(config)
  # The steps run on images of the data's shape where the data is at hand: a reader
  # such as medmnist holds grey or RGB images of any size. Files that would all be
  # decoded first (folder, csv, isic) are read only to time the pipeline.
  data = None
  if 'input_pipeline' in stages or (image_size is None
                                    and config.dataset not in _DECODING_READERS):
    data = load_data(config)
  if image_size is None and data is not None and data[0] is not None:
    shape, shape_from = data[0].image_shape, 'data'
  else:
    shape = image_shape(config, image_size)
    shape_from = 'flag' if image_size else 'preset'
  records = [{**benchmark_step(stage, config, num_classes=num_classes, steps=steps,
                               warmup=warmup, dtype=dtype, profile_dir=profile_dir, shape=shape),
              'image_shape_from': shape_from}
             for stage in STAGES if stage in stages]
  if 'input_pipeline' in stages:
    # After the steps, so that the pipeline's threads do not compete with them.
    records.append(time_input_pipeline(config, steps=steps, warmup=warmup, dtype=dtype,
                                       data=data))
  return records


def define_flags():
  """Flags of the command only: importing this module defines none (prepare.py has --image_size)."""
  config_flags.DEFINE_config_file('config', None, 'A stage-1 config file, e.g. '
                                  'configs/stage1.py:ham10000.', lock_config=True)
  flags.DEFINE_integer('steps', 20, 'Timed steps (and timed input batches).')
  flags.DEFINE_integer('warmup', 3, 'Untimed steps after compilation.')
  flags.DEFINE_integer('batch_size', None, 'Global batch; default config.batch_size.')
  flags.DEFINE_integer('image_size', None, "Image height = width; default the preset's.")
  flags.DEFINE_integer('num_classes', 10, 'Classes of the random labels.')
  flags.DEFINE_enum('dtype', None, list(DTYPES),
                    'Compute dtype of convolutions and dense layers; default config.dtype.')
  flags.DEFINE_string('profile_dir', None,
                      f'Also trace {PROFILE_STEPS} steps of each stage after the timed ones into '
                      'PROFILE_DIR/stage1 and PROFILE_DIR/stage2 (open with TensorBoard or XProf); '
                      "each step's record then lists the operations that took longest.")
  flags.DEFINE_list('stages', list(RECORDS), 'What to time, comma-separated: '
                    f'{", ".join(RECORDS)}.')
  launch_flags.define()
  flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  FLAGS = flags.FLAGS
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  config = FLAGS.config
  if FLAGS.batch_size is not None:
    config.batch_size = FLAGS.batch_size
  if FLAGS.profile_dir and CPU_TRACE_FLAG not in os.environ.get('XLA_FLAGS', ''):
    # Before any backend starts: XLA reads its flags once.
    os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_TRACE_FLAG}".strip()
  try:
    # As imbal_jax.main starts: the allocator's settings (CPU only), then the processes
    # of a multi-process run join; alone, on CPU, one device per core (a count that the
    # batch, its micro-batches and the evaluation batch divide, as training picks it).
    host_memory.retain_freed_memory()
    cpu_conv.available()  # IMBAL_JAX_CPU_CONV checked before any work
    if not distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                                  FLAGS.process_id):
      distributed.use_cpu_cores(distributed.config_batch_sizes(config),
                                float32=compute_dtype(config, FLAGS.dtype) == 'float32')
    records = run(config, steps=FLAGS.steps, warmup=FLAGS.warmup, image_size=FLAGS.image_size,
                  num_classes=FLAGS.num_classes, dtype=FLAGS.dtype,
                  profile_dir=FLAGS.profile_dir, stages=FLAGS.stages)
  except distributed.LaunchError as error:
    print(f'imbal_jax: launch error: {error}', file=sys.stderr)
    sys.exit(2)
  except (BenchmarkError, configuration.ConfigError, cpu_conv.CpuConvError) as error:
    print(f'imbal_jax: benchmark error: {error}', file=sys.stderr)
    sys.exit(2)
  if jax.process_index() == 0:
    for record in records:
      print(json.dumps(record), flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(main)
