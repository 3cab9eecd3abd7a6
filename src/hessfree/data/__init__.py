"""Datasets and corruption helpers (label noise) for experiments and tests."""
from hessfree.data.noise import flip_labels

__all__ = ["flip_labels"]
