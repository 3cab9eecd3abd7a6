"""Projections of per-sample gradients (placeholder: only exact gradients so far)."""
from __future__ import annotations

from typing import Any

from hessfree.errors import InputError


def make_projector(spec: Any, params: dict, *, device: Any = None) -> None:
    if spec is None:
        return None
    raise InputError(f"unknown projection {spec!r}")
