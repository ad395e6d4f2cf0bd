"""The data side of a run: loading its split, and what data.json records of it.

A run's split is saved in its data.json (with the data's fingerprint) and reused
on resume and by stage 2; the pixel statistics the encoder normalises with are
measured once, on the training split, and stage 2 reuses stage 1's.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

from imbal_jax.data import sources

# Pixel statistics come from up to this many training images (all of them for small sets),
# read this many at a time: float64 copies of 10,000 images at 224 px would take 12 GB.
PIXEL_SAMPLE, PIXEL_CHUNK = 10_000, 64


def pixel_statistics(split: sources.Split, seed: int) -> tuple[list[float], list[float]]:
  """Per-channel mean and standard deviation of pixels / 255 over a seeded sample of
  `split`, read once, chunk by chunk, in float64. The sums are taken about the first
  chunk's mean, so the variance does not cancel away; the std is floored at 1e-3 so
  that a constant channel (e.g. a blank border) does not divide by zero."""
  sample = np.sort(np.random.default_rng(seed).permutation(len(split))[:PIXEL_SAMPLE])
  channels = split.image_shape[-1]
  shift = total = squares = None
  for start in range(0, len(sample), PIXEL_CHUNK):
    pixels = split.take(sample[start:start + PIXEL_CHUNK]).astype(np.float64)
    pixels = pixels.reshape(-1, channels) / 255.0
    if shift is None:
      shift, total, squares = pixels.mean(axis=0), 0.0, 0.0
    total = total + (pixels - shift).sum(axis=0)
    squares = squares + np.square(pixels - shift).sum(axis=0)
  count = len(sample) * int(np.prod(split.image_shape[:-1]))
  offset = total / count
  variance = np.maximum(squares / count - np.square(offset), 0.0)
  return (shift + offset).tolist(), np.maximum(np.sqrt(variance), 1e-3).tolist()


def describe_data(dataset: sources.Dataset, seed: int,
                  pixel_stats: tuple[list[float], list[float]] | None = None) -> dict[str, Any]:
  """What the run saw: classes, counts per split, pixel statistics, the split spec.

  `pixel_stats` (mean, std) are used as given where the run must normalise as an
  earlier one did (stage 2 feeds the stage-1 encoder); else pixel_statistics.
  """
  mean, std = pixel_stats or pixel_statistics(dataset.splits['train'], seed)
  return {
      'dataset': dataset.name,
      'class_names': list(dataset.class_names),
      'image_shape': list(dataset.image_shape),
      'counts': {split: dataset.class_counts(split).tolist() for split in sources.SPLITS},
      'sizes': {split: len(dataset.splits[split]) for split in sources.SPLITS},
      'pixel_mean': list(mean),
      'pixel_std': list(std),
      'notes': list(dataset.notes),
      'spec': sources.spec_to_json(dataset.spec),
      'source_fingerprint': dataset.fingerprint,
  }


def load_dataset(config, workdir: pathlib.Path) -> sources.Dataset:
  """The run's data: the split saved in the workdir (resume) or by stage 1, else a new one."""
  saved = workdir / 'data.json'
  if config.stage == 'stage2':
    saved = pathlib.Path(config.init_from) / 'data.json'
  spec = fingerprint = None
  if saved.is_file():
    payload = json.loads(saved.read_text())
    spec = sources.spec_from_json(payload['spec'])
    # Absent from workdirs written before it existed: those are not checked.
    fingerprint = payload.get('source_fingerprint')
  return sources.load(config, spec, fingerprint, str(saved))


def stage1_pixel_stats(config) -> tuple[list[float], list[float]] | None:
  """Stage 2: the pixel statistics the stage-1 encoder was trained with (its data.json)."""
  if config.stage != 'stage2':
    return None
  info = json.loads((pathlib.Path(config.init_from) / 'data.json').read_text())
  return info['pixel_mean'], info['pixel_std']
