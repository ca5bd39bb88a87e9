"""deepclust: clustering-based unsupervised representation learning of images."""

__version__ = "0.1.0"
