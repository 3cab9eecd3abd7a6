"""Per-sample gradient primitives: parameter selection, factorised blocks, the engine."""
from hessfree.grads.engine import GradientEngine
from hessfree.grads.select import select_parameters

__all__ = ["GradientEngine", "select_parameters"]
