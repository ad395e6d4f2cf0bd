"""On-device preprocessing: uint8 images to normalised floats, with augmentation.

Runs inside the jitted step, so it is deterministic given the step's RNG and
costs no host time. Evaluation uses `normalize` alone.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

AUGMENTATIONS = ('none', 'crop', 'crop_flip')


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """uint8 [0, 255] -> float32 standardised per channel with the training statistics."""
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def _crop_flip_one(image, key, padding: int, flip: bool):
  height, width, channels = image.shape
  crop_key, flip_key = jax.random.split(key)
  padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  top, left = jax.random.randint(crop_key, (2,), 0, 2 * padding + 1)
  out = jax.lax.dynamic_slice(padded, (top, left, 0), (height, width, channels))
  if flip:
    out = jnp.where(jax.random.bernoulli(flip_key), out[:, ::-1, :], out)
  return out


def augment(images: jax.Array, rng: jax.Array, kind: str, padding: int) -> jax.Array:
  """Random translation by up to `padding` pixels (zero fill) and, for
  'crop_flip', a horizontal flip with probability 1/2. Works on normalised
  float images, so zero fill is the training mean."""
  if kind == 'none' or padding == 0 and kind == 'crop':
    return images
  keys = jax.random.split(rng, images.shape[0])
  return jax.vmap(lambda im, k: _crop_flip_one(im, k, padding, kind == 'crop_flip'))(images, keys)
