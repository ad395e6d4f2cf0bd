"""Models: ResNet encoders and the heads that sit on them."""

from imbal_jax.models.heads import LinearHead, ProjectionHead, Stage1Net, encoder_variables
from imbal_jax.models.resnet import ARCHITECTURES, ResNet, make_encoder

__all__ = ['ARCHITECTURES', 'LinearHead', 'ProjectionHead', 'ResNet', 'Stage1Net',
           'encoder_variables', 'make_encoder']
