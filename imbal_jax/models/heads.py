"""Heads on top of the encoder's pooled features, and the stage-1 network."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class LinearHead(nn.Module):
  """The classifier: one dense layer from features to class logits."""

  num_classes: int

  @nn.compact
  def __call__(self, features):
    return nn.Dense(self.num_classes, name='dense')(features)


class ProjectionHead(nn.Module):
  """MLP projection for the metric loss, L2-normalised output (Khosla et al. 2020).

  Used only in stage 1: the classifier reads the encoder features, not these.
  """

  hidden_dim: int
  output_dim: int

  @nn.compact
  def __call__(self, features):
    x = nn.relu(nn.Dense(self.hidden_dim, name='hidden')(features))
    x = nn.Dense(self.output_dim, name='output')(x)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class Stage1Net(nn.Module):
  """Encoder with a classifier head and a projection head.

  Variables: params {'encoder', 'classifier', 'projection'} and
  batch_stats {'encoder'}; stage 2 takes the 'encoder' parts as constants.
  """

  encoder: nn.Module
  num_classes: int
  projection_dim: int

  def setup(self):
    self.classifier = LinearHead(self.num_classes)
    self.projection = ProjectionHead(hidden_dim=self.projection_dim * 4,
                                     output_dim=self.projection_dim)

  def __call__(self, images, train: bool = True):
    features = self.encoder(images, train=train)
    return self.classifier(features), self.projection(features)


def encoder_variables(params, batch_stats) -> dict[str, jax.Array]:
  """The frozen-encoder part of stage-1 variables, ready for `encoder.apply`."""
  return {'params': params['encoder'], 'batch_stats': batch_stats['encoder']}
