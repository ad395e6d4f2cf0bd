"""imbal_jax: two-stage training for class-imbalanced image classification in JAX/Flax."""

__version__ = "0.1.0"
