"""Public alias: ``hessfree.baselines.loss / grand / el2n``."""
from hessfree.methods.baselines import el2n, grand, loss

__all__ = ["loss", "grand", "el2n"]
