"""Public alias: ``hessfree.metrics`` (see :mod:`hessfree.evaluate.metrics`)."""
from hessfree.evaluate.metrics import *  # noqa: F401,F403
from hessfree.evaluate.metrics import __all__  # noqa: F401
