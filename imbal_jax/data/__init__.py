"""Data: sources, the long-tail protocol, samplers, augmentation and batching."""
