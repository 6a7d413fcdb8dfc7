"""Distributed normalization-study sweeps for BDD100K drivable-area segmentation."""

__version__ = "0.1.0"
