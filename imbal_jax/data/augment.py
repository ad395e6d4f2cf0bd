"""On-device preprocessing: uint8 images to normalised floats, with augmentation.

Runs inside the jitted step, so it is deterministic given the step's RNG and
costs no host time. `config.augment` is '+'-joined operations applied in this
order, each with its own per-image randomness:

  rrc     random resized crop: area 35-100 %, aspect ratio 3/4-4/3, resized back
  crop    random translation by up to `crop_padding` pixels (zero fill)
  flip    horizontal flip with probability 1/2
  vflip   vertical flip with probability 1/2 (lesions and cells have no "up")
  rot90   rotation by a random multiple of 90 degrees (square images)
  jitter  brightness, contrast and saturation, each scaled by up to +-20 %

'none' disables augmentation. Evaluation uses `normalize` alone.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

OPERATIONS = ('rrc', 'crop', 'flip', 'vflip', 'rot90', 'jitter')


def parse(spec: str) -> tuple[str, ...]:
  """'crop+flip' -> ('crop', 'flip'); raises ValueError naming unknown operations."""
  if spec in ('', 'none'):
    return ()
  operations = tuple(spec.split('+'))
  unknown = [op for op in operations if op not in OPERATIONS]
  if unknown:
    raise ValueError(f'config.augment={spec!r}: unknown operation(s) {unknown}; use '
                     f"'none' or '+'-joined names from {OPERATIONS}.")
  return operations


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """[0, 1] floats (or uint8) -> standardised per channel with the training statistics."""
  x = images.astype(jnp.float32)
  if images.dtype == jnp.uint8:
    x = x / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def _random_resized_crop(image, key):
  height, width, _ = image.shape
  area_key, ratio_key, y_key, x_key = jax.random.split(key, 4)
  area = jax.random.uniform(area_key, minval=0.35, maxval=1.0) * height * width
  log_ratio = jax.random.uniform(ratio_key, minval=jnp.log(3 / 4), maxval=jnp.log(4 / 3))
  ratio = jnp.exp(log_ratio)
  crop_h = jnp.clip(jnp.sqrt(area / ratio), 1.0, height)
  crop_w = jnp.clip(jnp.sqrt(area * ratio), 1.0, width)
  top = jax.random.uniform(y_key) * (height - crop_h)
  left = jax.random.uniform(x_key) * (width - crop_w)
  scale = jnp.stack([height / crop_h, width / crop_w])
  translation = -jnp.stack([top, left]) * scale
  return jax.image.scale_and_translate(image, image.shape, (0, 1), scale, translation,
                                       method='linear', antialias=False)


def _translate(image, key, padding):
  height, width, channels = image.shape
  padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  top, left = jax.random.randint(key, (2,), 0, 2 * padding + 1)
  return jax.lax.dynamic_slice(padded, (top, left, 0), (height, width, channels))


def _rot90(image, key):
  k = jax.random.randint(key, (), 0, 4)
  return jax.lax.switch(k, [lambda x, t=t: jnp.rot90(x, t, axes=(0, 1)) for t in range(4)], image)


def _jitter(image, key):
  b_key, c_key, s_key = jax.random.split(key, 3)
  factor = lambda k: jax.random.uniform(k, minval=0.8, maxval=1.2)
  image = image * factor(b_key)
  mean = jnp.mean(image)
  image = (image - mean) * factor(c_key) + mean
  if image.shape[-1] == 3:
    grey = jnp.mean(image, axis=-1, keepdims=True)
    image = (image - grey) * factor(s_key) + grey
  return jnp.clip(image, 0.0, 1.0)


def _augment_one(image, key, operations, padding):
  keys = jax.random.split(key, len(OPERATIONS))
  for name, op_key in zip(OPERATIONS, keys):
    if name not in operations:
      continue
    if name == 'rrc':
      image = _random_resized_crop(image, op_key)
    elif name == 'crop' and padding > 0:
      image = _translate(image, op_key, padding)
    elif name == 'flip':
      image = jnp.where(jax.random.bernoulli(op_key), image[:, ::-1], image)
    elif name == 'vflip':
      image = jnp.where(jax.random.bernoulli(op_key), image[::-1], image)
    elif name == 'rot90' and image.shape[0] == image.shape[1]:
      image = _rot90(image, op_key)
    elif name == 'jitter':
      image = _jitter(image, op_key)
  return image


def augment(images: jax.Array, rng: jax.Array, spec: str, padding: int) -> jax.Array:
  """Augments [batch, h, w, c] floats in [0, 1]; one independent draw per image."""
  operations = parse(spec)
  if not operations:
    return images
  keys = jax.random.split(rng, images.shape[0])
  return jax.vmap(lambda image, key: _augment_one(image, key, operations, padding))(images, keys)
