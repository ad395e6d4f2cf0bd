"""ResNet encoders (Flax Linen). Each returns pooled features [batch, dim].

- `resnet32`: the CIFAR-style ResNet of He et al. (2016), section 4.2: a 3x3
  stem, three stages of 5 basic blocks at widths w, 2w, 4w (w=16 originally),
  parameter-free zero-padding shortcuts ("option A").
  It is the backbone of the CIFAR-10/100-LT benchmarks (Cao et al. 2019).
- `resnet18`, `resnet50`: the ImageNet-style ResNets, base width w (64
  originally). For small images (below 64 px) the 7x7/2 stem and max-pool would
  throw away most of the image, so a 3x3/1 stem replaces them, as is common for
  CIFAR-sized inputs.

`dtype` is the compute dtype of convolutions (bfloat16 for mixed precision);
parameters and batch-norm statistics stay float32 and the pooled features are
returned in float32.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from imbal_jax import cpu_conv

ModuleDef = Any


@jax.custom_jvp
def relu_add(a, b):
  """`relu(a + b)`, the end of every residual block, written as `max(a, -b) + b`.

  The two are equal in floating point: where a > -b both round a + b, elsewhere
  both give 0. The difference is for XLA. Written as relu(a + b), the block's
  last operation is a maximum with one large operand, which XLA's fusion pass
  considers free to recompute. It then recomputes each block's output, and
  through the residual sums every earlier block's output of the stage, inside
  every fusion that reads it (forward, relu masks, the copies feeding the filter
  gradients): 6 batch norms, residual sums and relus in one fusion at the end of
  a 5-block stage. Ending on an addition of two large operands makes XLA keep
  the sum in memory once and read it from there (docs/performance.md).
  The derivative is relu's: 1 where the output is positive, 0 elsewhere.
  """
  return jnp.maximum(a, -b) + b


@relu_add.defjvp
def _relu_add_jvp(primals, tangents):
  out = relu_add(*primals)
  da, db = tangents
  return out, jnp.where(out > 0, da + db, jnp.zeros_like(da))

# Batch norm as every encoder here uses it. Checked in flax 0.12.8 (and in
# tests/test_precision.py): with dtype=bfloat16 the running statistics, scale
# and bias stay float32, and force_float32_reductions computes the batch mean
# and variance and the normalisation itself in float32; only the output is cast
# to dtype. A bfloat16 reduction would lose the variance of large activations.
BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5,
                              force_float32_reductions=True)


class BasicBlock(nn.Module):
  filters: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  # 'projection': 1x1 conv + BN when the shape changes (ImageNet ResNets, "option B");
  # 'pad': subsample and zero-pad channels, no parameters (CIFAR ResNets, "option A").
  shortcut: str = 'projection'

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), (self.strides, self.strides))(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3))(y)
    # Zero-init the last scale so each block starts as the identity (Goyal et al. 2017).
    y = self.norm(scale_init=nn.initializers.zeros)(y)
    if residual.shape != y.shape and self.shortcut == 'pad':
      residual = residual[:, ::self.strides, ::self.strides, :]
      extra = y.shape[-1] - residual.shape[-1]
      residual = jnp.pad(residual, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    elif residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), (self.strides, self.strides))(residual)
      residual = self.norm()(residual)
    return relu_add(y, residual)


class BottleneckBlock(nn.Module):
  filters: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    residual = x
    y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x)))
    y = self.conv(self.filters, (3, 3), (self.strides, self.strides))(y)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters * 4, (1, 1))(y)
    y = self.norm(scale_init=nn.initializers.zeros)(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters * 4, (1, 1), (self.strides, self.strides))(residual)
      residual = self.norm()(residual)
    return relu_add(y, residual)


class ResNet(nn.Module):
  """A ResNet trunk: stem, stages of residual blocks, global average pool."""

  stage_sizes: Sequence[int]
  block: Callable[..., nn.Module]
  width: int
  small_stem: bool = True
  shortcut: str = 'projection'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    # On CPU, oneDNN computes the float32 convolutions where its kernels are built
    # (imbal_jax.cpu_conv); elsewhere this is lax.conv_general_dilated.
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, padding='SAME',
                             conv_general_dilated=cpu_conv.conv_general_dilated)
    norm = functools.partial(BatchNorm, use_running_average=not train, dtype=self.dtype)
    x = x.astype(self.dtype)
    if self.small_stem:
      x = nn.relu(norm()(conv(self.width, (3, 3))(x)))
    else:
      x = nn.relu(norm()(conv(self.width, (7, 7), (2, 2))(x)))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    for stage, num_blocks in enumerate(self.stage_sizes):
      for index in range(num_blocks):
        strides = 2 if stage > 0 and index == 0 else 1
        block = functools.partial(self.block, conv=conv, norm=norm)
        if self.block is BasicBlock:
          block = functools.partial(block, shortcut=self.shortcut)
        x = block(self.width * 2**stage, strides)(x)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


# name -> (stage sizes, block, default base width)
ARCHITECTURES = {
    'resnet32': ((5, 5, 5), BasicBlock, 16),
    'resnet18': ((2, 2, 2, 2), BasicBlock, 64),
    'resnet50': ((3, 4, 6, 3), BottleneckBlock, 64),
}


def make_encoder(name: str, width: int | None = None, image_size: int = 32,
                 dtype: Any = 'float32') -> ResNet:
  """Builds encoder `name` computing in `dtype`; `width` 0 or None keeps the default width."""
  if name not in ARCHITECTURES:
    raise ValueError(
        f'config.model={name!r} is not a known model; choose one of {sorted(ARCHITECTURES)}.')
  stage_sizes, block, default_width = ARCHITECTURES[name]
  # The CIFAR-style net always uses the small stem; ImageNet-style nets only below 64 px.
  cifar_style = name == 'resnet32'
  small_stem = cifar_style or image_size < 64
  return ResNet(stage_sizes=stage_sizes, block=block, width=width or default_width,
                small_stem=small_stem, shortcut='pad' if cifar_style else 'projection',
                dtype=jnp.dtype(dtype))
