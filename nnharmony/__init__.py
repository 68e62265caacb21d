"""nnharmony: one segmentation model across many heterogeneous datasets, on nnU-Net v2."""
__version__ = "0.1.0"
