"""One prepared GPU session: the numbers issue #5 asks of a GPU, in one process.

  python benchmarks/gpu_check.py --out=DIR [--budget_seconds=330]

In priority order, each result appended to DIR/gpu_results.jsonl as soon as it is known
(so a run cut short still leaves what it finished):
  1. bf16 against float32 (highest precision) stage-1 loss on the same ResNet-50 224 px
     parameters and batch: the mixed-precision check on the hardware it is meant for.
  2. The stage-1 step of the `isic2019` preset (ResNet-50, 224 px, CE + SupCon) in
     bfloat16 at global batch 256, with a 3-step trace (DIR/profile_summary.json, the
     trace itself gzipped as DIR/stage1.xplane.pb.gz).
  3. Variants that say where the time goes: batch 128 (the preset's) and 512, the
     device augmentation reduced to flips, float32 (TF32), stage 2, and the
     `cifar10_lt` ResNet-32 row.
  4. The host input pipeline alone on a synthetic prepared 224 px cache.
Stops starting new measurements once --budget_seconds have passed.
"""

from __future__ import annotations

import argparse
import collections
import functools
import gzip
import json
import os
import pathlib
import re
import shutil
import sys
import tempfile
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from imbal_jax import benchmark, configuration, steps  # noqa: E402
from imbal_jax.models import Stage1Net, make_encoder  # noqa: E402

START = time.monotonic()


def stage1_config(preset: str, **overrides):
  module = configuration.load_config_file(configuration.CONFIGS / 'stage1.py', 'gpu_check_stage1')
  config = module.get_config(preset)
  config.update(**overrides)
  return configuration.resolve(config)


class Log:

  def __init__(self, out: pathlib.Path):
    self.path = out / 'gpu_results.jsonl'

  def write(self, name: str, record: dict):
    record = {'name': name, 'elapsed_s': round(time.monotonic() - START, 1), **record}
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    print(json.dumps(record), flush=True)


def precision_check(batch_size: int = 32, image_size: int = 224, seed: int = 0) -> dict:
  """stage1_loss in float32 ('highest': no TF32) and in bfloat16, same params and batch."""
  config = stage1_config('isic2019')
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8)
  labels = rng.integers(0, 8, batch_size).astype(np.int32)
  x = steps.preprocess(jnp.asarray(images), None, pixel_mean=(0.5,) * 3, pixel_std=(0.25,) * 3,
                       augment='none', crop_padding=0)
  results = {}
  variables = None
  for dtype in ('float32', 'bfloat16'):
    model = Stage1Net(encoder=make_encoder('resnet50', 64, image_size, dtype), num_classes=8,
                      projection_dim=config.projection_dim, dtype=jnp.dtype(dtype))
    if variables is None:
      variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(seed), x[:1])
    loss_fn = jax.jit(functools.partial(steps.stage1_loss, model=model,
                                        contrastive_weight=config.contrastive_weight,
                                        temperature=config.temperature))
    with jax.default_matmul_precision('highest' if dtype == 'float32' else 'default'):
      loss, aux = loss_fn(variables['params'], variables['batch_stats'], x, labels)
    results[dtype] = {'loss': float(loss), 'ce': float(aux['ce']),
                      'contrastive': float(aux['contrastive']), 'loss_dtype': str(loss.dtype)}
  rel = {k: abs(results['bfloat16'][k] - results['float32'][k]) / abs(results['float32'][k])
         for k in ('loss', 'ce', 'contrastive')}
  finite = all(np.isfinite(results['bfloat16'][k]) for k in ('loss', 'ce', 'contrastive'))
  return {**results, 'relative_difference': rel, 'bf16_finite': finite,
          'within_1e-2': finite and max(rel.values()) <= 1e-2}


def summarise_trace(trace_dir: str, steps_traced: int, top: int = 25) -> dict:
  """Per device plane: busy time per line, and the longest ops / kernels per step."""
  traces = sorted(pathlib.Path(trace_dir).glob('**/*.xplane.pb'), key=os.path.getmtime)
  if not traces:
    return {'error': 'no xplane.pb written'}
  profile = jax.profiler.ProfileData.from_file(str(traces[-1]))
  summary = {'xplane': str(traces[-1]), 'planes': {}}
  for plane in profile.planes:
    if not plane.name.startswith('/device:'):
      continue
    lines = {}
    for line in plane.lines:
      totals, count = collections.Counter(), collections.Counter()
      for event in line.events:
        key = re.sub(r'\.\d+$', '', event.name)
        totals[key] += event.duration_ns / 1e6 / steps_traced
        count[key] += 1
      lines[line.name] = {
          'busy_ms_per_step': round(sum(totals.values()), 3),
          'top_ms_per_step': [[k, round(v, 3), count[k] // steps_traced]
                              for k, v in totals.most_common(top)]}
    summary['planes'][plane.name] = lines
  return summary


def bench(log: Log, name: str, stage: str, config, *, profile_dir: str | None = None,
          steps_: int = 30):
  record = benchmark.benchmark_step(stage, config, steps=steps_, warmup=5,
                                    profile_dir=profile_dir)
  log.write(name, record)
  return record


def synthetic_prepared(directory: pathlib.Path, count: int, size: int, classes: int = 8):
  """A cache as imbal_jax.prepare writes it, of random images (the pipeline's cost only)."""
  directory.mkdir(parents=True)
  rng = np.random.default_rng(0)
  images = np.lib.format.open_memmap(directory / 'images.npy', 'w+', np.uint8,
                                     (count, size, size, 3))
  for start in range(0, count, 1024):
    stop = min(count, start + 1024)
    images[start:stop] = rng.integers(0, 256, (stop - start, size, size, 3), dtype=np.uint8)
  images.flush()
  labels = (np.arange(count) % classes).astype(np.int32)
  parts = np.zeros(count, np.int8)
  parts[-count // 10:] = 2
  parts[-count // 5:-count // 10] = 1
  np.save(directory / 'labels.npy', labels)
  np.save(directory / 'parts.npy', parts)
  meta = {'name': 'synthetic', 'class_names': [f'c{i}' for i in range(classes)],
          'image_size': size, 'count': count,
          'class_counts': np.bincount(labels, minlength=classes).tolist(),
          'source': {'dataset': 'synthetic', 'data_path': '', 'labels_csv': ''}, 'notes': []}
  (directory / 'meta.json').write_text(json.dumps(meta))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', required=True)
  parser.add_argument('--budget_seconds', type=float, default=330)
  parser.add_argument('--small', action='store_true',
                      help='tiny shapes, to try the script itself on a CPU')
  parser.add_argument('--only', default='',
                      help='comma-separated measurement names: run only these')
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  log = Log(out)
  log.write('environment', {'jax': jax.__version__, 'devices': [str(d) for d in jax.devices()],
                            'device_kind': jax.devices()[0].device_kind,
                            'xla_flags': os.environ.get('XLA_FLAGS', '')})

  big = dict(image_size=224, batch_size=256, dtype='bfloat16')
  small = dict(image_size=32, batch_size=16, width=8)
  main_overrides = small if args.small else big
  trace_root = tempfile.mkdtemp(prefix='gpu_trace_')

  def over_budget():
    return time.monotonic() - START > args.budget_seconds

  only = set(filter(None, args.only.split(',')))

  def guarded(name, fn):
    if only and name not in only:
      return None
    if over_budget():
      log.write(name, {'skipped': 'over budget'})
      return None
    try:
      return fn()
    except Exception as error:  # one failure must not cost the rest of the session
      log.write(name, {'error': repr(error), 'traceback': traceback.format_exc()[-3000:]})
      return None

  if not args.small:
    guarded('precision_bf16_vs_f32_resnet50_224', lambda: log.write(
        'precision_bf16_vs_f32_resnet50_224', precision_check()))

  def main_row():
    config = stage1_config('isic2019', **main_overrides)
    record = bench(log, 'stage1_isic2019_b256_bf16', 'stage1', config, profile_dir=trace_root)
    summary = summarise_trace(os.path.join(trace_root, 'stage1'), benchmark.PROFILE_STEPS)
    (out / 'profile_summary.json').write_text(json.dumps(summary, indent=1))
    xplane = summary.get('xplane')
    if xplane:
      with open(xplane, 'rb') as source, gzip.open(out / 'stage1.xplane.pb.gz', 'wb') as target:
        shutil.copyfileobj(source, target)
      if os.path.getsize(out / 'stage1.xplane.pb.gz') > 15 * 2**20:
        os.remove(out / 'stage1.xplane.pb.gz')  # over what comes back
    return record

  guarded('stage1_isic2019_b256_bf16', main_row)
  variants = [
      ('stage1_isic2019_b128_bf16', 'stage1', 'isic2019', {**main_overrides, 'batch_size': 128}),
      ('stage1_isic2019_b256_bf16_flip_only', 'stage1', 'isic2019',
       {**main_overrides, 'augment': 'flip'}),
      ('stage2_isic2019_b256_bf16', 'stage2', 'isic2019', main_overrides),
      'input_pipeline',
      ('stage1_cifar10_lt_b128_f32', 'stage1', 'cifar10_lt', {}),
      ('stage1_isic2019_b512_bf16', 'stage1', 'isic2019', {**main_overrides, 'batch_size': 512}),
      ('stage1_isic2019_b256_f32', 'stage1', 'isic2019', {**main_overrides, 'dtype': 'float32'}),
  ]

  def pipeline_row():
    directory = pathlib.Path(tempfile.mkdtemp(prefix='gpu_prepared_')) / 'synthetic_224'
    size = 32 if args.small else 224
    synthetic_prepared(directory, 2048 if args.small else 8192, size)
    for workers in (0, 4):
      config = stage1_config('isic2019', dataset='prepared', data_path=str(directory),
                             image_size=size, batch_size=main_overrides['batch_size'],
                             data_workers=workers)
      log.write(f'input_pipeline_prepared_{size}_workers{workers}',
                benchmark.time_input_pipeline(config, steps=20, warmup=3))

  for variant in variants:
    if variant == 'input_pipeline':
      guarded('input_pipeline', pipeline_row)
      continue
    name, stage, preset, overrides = variant
    if args.small and preset == 'isic2019':
      overrides = {**overrides, **{k: v for k, v in small.items() if k != 'batch_size'},
                   'batch_size': min(overrides.get('batch_size', 16), 32)}
    guarded(name, lambda: bench(log, name, stage, stage1_config(preset, **overrides),
                                steps_=3 if args.small else 30))
  log.write('done', {'total_s': round(time.monotonic() - START, 1)})


if __name__ == '__main__':
  main()
