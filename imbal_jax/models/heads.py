"""Heads on top of the encoder's pooled features, and the stage-1 network.

`dtype` is the compute dtype of the hidden dense layers; parameters are float32,
and the layers that produce a head's output (the logits, the embeddings) compute
in float32 from float32 inputs, so the losses see float32 values, not bfloat16
ones cast up. Those layers are small next to the encoder.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class LinearHead(nn.Module):
  """The classifier: one dense layer from features to class logits."""

  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features):
    return nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32,
                    name='dense')(features.astype(jnp.float32))


class ProjectionHead(nn.Module):
  """MLP projection for the metric loss, L2-normalised output (Khosla et al. 2020).

  Used only in stage 1: the classifier reads the encoder features, not these.
  """

  hidden_dim: int
  output_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features):
    x = nn.relu(nn.Dense(self.hidden_dim, dtype=self.dtype, param_dtype=jnp.float32,
                         name='hidden')(features))
    # The embedding in float32: bfloat16 keeps under 3 significant digits, and the
    # contrastive loss divides similarities by its temperature (0.1).
    x = nn.Dense(self.output_dim, dtype=jnp.float32, param_dtype=jnp.float32,
                 name='output')(x.astype(jnp.float32))
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class Stage1Net(nn.Module):
  """Encoder with a classifier head and a projection head.

  Variables: params {'encoder', 'classifier', 'projection'} and
  batch_stats {'encoder'}; stage 2 takes the 'encoder' parts as constants.
  `dtype` is the heads' compute dtype (the encoder has its own, set by
  make_encoder); both outputs are float32. With `probe_classifier` the
  classifier reads the features through stop_gradient: it is trained as a
  linear probe while the encoder learns from the metric loss alone (SupCon-only
  pre-training, Khosla et al. 2020), and its validation score still tracks the
  representation, so model selection keeps its meaning.
  """

  encoder: nn.Module
  num_classes: int
  projection_dim: int
  dtype: Any = jnp.float32
  probe_classifier: bool = False

  def setup(self):
    self.classifier = LinearHead(self.num_classes, dtype=self.dtype)
    self.projection = ProjectionHead(hidden_dim=self.projection_dim * 4,
                                     output_dim=self.projection_dim, dtype=self.dtype)

  def __call__(self, images, train: bool = True):
    features = self.encoder(images, train=train)
    classifier_input = jax.lax.stop_gradient(features) if self.probe_classifier else features
    return self.classifier(classifier_input), self.projection(features)


def encoder_variables(params, batch_stats) -> dict[str, jax.Array]:
  """The frozen-encoder part of stage-1 variables, ready for `encoder.apply`."""
  return {'params': params['encoder'], 'batch_stats': batch_stats['encoder']}
