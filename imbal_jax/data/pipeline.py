"""Host-side batching: training batches by step, padded evaluation batches.

A training batch is a pure function of the global step (the sampler is
seeded by (seed, epoch)), so resuming at step s continues with exactly the
batches an uninterrupted run would have seen. Batches are produced by a grain
`MapDataset` over step numbers: grain prefetches them on threads (or on
worker processes, `config.data_workers`) while the device trains. The
iterator's position is the train state's step, saved with every checkpoint;
a resumed run starts its iterator there, whatever its number of workers. With several
processes each takes its own contiguous slice of the global batch.
"""

from __future__ import annotations

import math
import signal
from typing import Iterator

import grain
from absl import flags
import jax
import numpy as np

from imbal_jax.data import samplers
from imbal_jax.data.sources import Split


class TrainBatches:
  """Global-batch index stream for one training run."""

  def __init__(self, split: Split, num_classes: int, batch_size: int, sampler: str, seed: int,
               num_epochs: int, pairs: bool = False, process_index: int | None = None,
               process_count: int | None = None):
    if len(split) == 0:
      raise ValueError('the training split is empty.')
    self.split = split
    self.num_classes = num_classes
    self.batch_size = batch_size
    self.sampler = sampler
    self.seed = seed
    self.num_epochs = num_epochs
    self.pairs = pairs  # see samplers: every class in a batch at least twice
    # Read here, not in local_batch: grain's worker processes (config.data_workers) run
    # local_batch on a pickled copy, in a process where jax.distributed was never
    # initialised and jax would report one process of index 0.
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f'process_index={self.process_index} is not one of the '
                       f'{self.process_count} processes.')
    # Nothing is dropped: the last batch of an epoch is topped up by the sampler.
    self.steps_per_epoch = math.ceil(len(split) / batch_size)
    self.total_steps = self.steps_per_epoch * num_epochs
    # (epoch, indices), replaced as one tuple: grain calls `indices` from several
    # threads, and a reader must never pair one epoch's number with another's indices.
    self._cache = (None, None)

  def indices(self, step: int) -> np.ndarray:
    epoch, offset = divmod(step, self.steps_per_epoch)
    cached_epoch, epoch_indices = self._cache
    if cached_epoch != epoch:
      epoch_indices = samplers.epoch_indices(
          self.split.labels, self.num_classes, self.sampler, self.seed, epoch,
          self.steps_per_epoch * self.batch_size, self.num_epochs, pairs=self.pairs)
      self._cache = (epoch, epoch_indices)
    return epoch_indices[offset * self.batch_size:(offset + 1) * self.batch_size]

  def local_slice(self, global_rows: int) -> slice:
    """This process's contiguous share of a global batch of `global_rows` rows."""
    per_process = global_rows // self.process_count
    return slice(self.process_index * per_process, (self.process_index + 1) * per_process)

  def local_indices(self, step: int) -> np.ndarray:
    """The example indices of this process's slice of the global batch at `step`."""
    return self.indices(step)[self.local_slice(self.batch_size)]

  def local_batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's slice of the global batch at `step`."""
    local = self.local_indices(step)
    return {'image': self.split.take(local), 'label': self.split.labels[local]}


def eval_batches(split: Split, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """This process's slices of padded global evaluation batches, with a 'mask'.

  Global batch b holds rows b * batch_size onwards, padded with zero images (mask 0)
  at its end; each process reads only the rows of its own slice.
  """
  per_process = batch_size // jax.process_count()
  start = jax.process_index() * per_process
  shape = tuple(split.image_shape)
  for first in range(0, len(split), batch_size):
    rows = np.arange(first + start, min(first + start + per_process, len(split)))
    pad = per_process - len(rows)
    images = split.take(rows) if len(rows) else np.zeros((0,) + shape, np.uint8)
    labels = split.labels[rows]
    mask = np.concatenate([np.ones(len(rows), np.float32), np.zeros(pad, np.float32)])
    if pad:
      images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
      labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
    yield {'image': images, 'label': labels, 'mask': mask}


def train_iterator(batches: TrainBatches, num_workers: int = 0, start_step: int = 0,
                   prefetch: int = 4):
  """A grain iterator over this process's part of each training batch from `start_step` on."""
  dataset = grain.MapDataset.range(start_step, batches.total_steps).map(batches.local_batch)
  iterable = dataset.to_iter_dataset(grain.ReadOptions(num_threads=2,
                                                       prefetch_buffer_size=prefetch))
  if num_workers > 0:
    # grain's workers read absl flags (defaults suffice); when imbal_jax is used as a
    # library, not through `python -m imbal_jax.main`, nothing has parsed them yet.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers),
                                    worker_init_fn=_ignore_stop_signals)
  return iter(iterable)


def _ignore_stop_signals(worker_index: int, worker_count: int) -> None:
  """In each grain worker: leave Ctrl-C and SIGTERM to the main process.

  A terminal's Ctrl-C (and scancel's SIGTERM) reaches the whole process group. The
  main process answers by saving a checkpoint after the step in progress
  (workdir.StopRequest), which needs the workers' next batch; a worker that died
  of the signal would instead fail that next() and lose the checkpoint.
  """
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
