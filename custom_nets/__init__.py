"""Joint self-supervised image-volume representation learning (arXiv 2212.01893) on MONAI."""

__version__ = "0.1.0"
