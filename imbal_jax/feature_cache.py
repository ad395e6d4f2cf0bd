"""Stage 2 on cached features: the frozen trunk runs once per image, not once per step.

In stage 2 the trunk (the encoder; for LWS the encoder and stage-1
classifier) never changes, so its output for a given input image is a
constant. With `config.cache_features` it is computed once for the training
split, in `config.feature_views` views (view 0: the plain image; views 1 and
up: `config.augment` with fixed seeds), and kept on the host. Every step then
reads, for the indices the sampler would have given the image path, one
view's rows (drawn per row from (seed, step)) and trains the head alone.

With one view this is the image path with augment='none', up to float
rounding: same batches, same initial head, same updates.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np

from imbal_jax import sharding, steps
from imbal_jax.data import pipeline
from imbal_jax.data.sources import Split


def trunk_fn(trunk: nn.Module, mesh, pixel_stats: tuple[Any, Any], *, augment: str,
             crop_padding: int) -> Callable:
  """Jitted (variables, uint8 images, rng or None) -> the trunk's outputs, replicated.

  With rng None the images are not augmented (view 0). `pixel_stats` (mean, std)
  are arguments of the compiled program, as in stages.jit_train_step.
  """
  def outputs(variables, images, rng, pixel_mean, pixel_std):
    x = steps.preprocess(images, rng, pixel_mean=pixel_mean, pixel_std=pixel_std,
                         augment=augment, crop_padding=crop_padding)
    return trunk.apply(variables, x, train=False)

  jitted = jax.jit(outputs, out_shardings=sharding.replicated(mesh),
                   compiler_options=sharding.compiler_options(mesh))
  mean, std = steps.put_pixel_stats(pixel_stats, mesh)
  return lambda variables, images, rng: jitted(variables, images, rng, mean, std)


def compute_features(outputs_fn: Callable, variables, split: Split, *, batch_size: int, mesh,
                     views: int = 1, seed: int = 0) -> np.ndarray:
  """[views, examples, dim] outputs of `trunk_fn` for `split`, in order; view 0 is plain."""
  tables = []
  for view in range(views):
    view_rng = jax.random.fold_in(jax.random.key(seed), view) if view else None
    outputs = []
    # One batch in flight at a time, as in train.evaluate; outputs are replicated.
    for index, batch in enumerate(pipeline.eval_batches(split, batch_size)):
      images = sharding.put_global_batch({'image': batch['image']}, mesh)['image']
      rng = None if view_rng is None else jax.random.fold_in(view_rng, index)
      outputs.append(np.asarray(jax.device_get(outputs_fn(variables, images, rng))))
    tables.append(np.concatenate(outputs)[:len(split)])
  return np.stack(tables)


class FeatureBatches:
  """The training batches of `batches` as rows of a feature table instead of images.

  Offers what pipeline.train_iterator reads (total_steps, local_batch), so the
  loop, its checkpointed iterator state and resumption work unchanged.
  """

  def __init__(self, batches: pipeline.TrainBatches, table: np.ndarray, seed: int):
    self.batches = batches
    self.table = table  # [views, examples, dim]
    self.seed = seed
    self.total_steps = batches.total_steps

  def local_batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's slice of the global batch at `step`: {'feature', 'label'}."""
    indices = self.batches.indices(step)
    # Drawn for the global batch, then sliced, so every process agrees.
    views = np.random.default_rng([self.seed, step]).integers(len(self.table), size=len(indices))
    # The process index comes from `batches` (read when it was made), never from jax
    # here: this may run in a grain worker process (see pipeline.TrainBatches).
    local = self.batches.local_slice(len(indices))
    return {'feature': self.table[views[local], indices[local]],
            'label': self.batches.split.labels[indices[local]]}


def head_step(state: steps.TrainState, batch, rng, *, head: nn.Module,
              learning_rate_fn: Callable):
  """steps.stage2_step from the trunk's output on: one SGD step of the head.

  `rng` is unused (the features are fixed); it keeps the loop's step signature.
  """
  del rng
  return steps.head_update(state, batch['feature'], batch['label'], head=head,
                           learning_rate_fn=learning_rate_fn)
