"""ST++ semi-supervised semantic segmentation, distributed with Ray."""

__version__ = "0.1.0"
