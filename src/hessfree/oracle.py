"""Ground-truth oracles (``hessfree.oracle``): exact leave-one-out replay and finite-difference
down-weighting of a recorded SGD run. See :mod:`hessfree.evaluate.replay`."""
from hessfree.evaluate.replay import finite_difference, loo_replay

__all__ = ["loo_replay", "finite_difference"]
