"""Datasets and corruption helpers: loaders for the shared real data, seeded label noise."""
from hessfree.data.noise import flip_labels, flip_labels_class_dependent
from hessfree.data.shared import DataNotFoundError, TabularData, adult, data_root, fairness_poisoning

__all__ = ["flip_labels", "flip_labels_class_dependent", "adult", "fairness_poisoning", "data_root",
           "TabularData", "DataNotFoundError"]
