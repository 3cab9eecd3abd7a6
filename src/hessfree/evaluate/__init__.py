"""Evaluation metrics for training-data attribution (see :mod:`hessfree.evaluate.metrics`)."""

from .metrics import *  # noqa: F401,F403
from .metrics import __all__  # noqa: F401
