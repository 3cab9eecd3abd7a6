"""Exception types. Each message says what went wrong and what to do about it."""
from __future__ import annotations


class HessfreeError(Exception):
    """Base class of every error hessfree raises on purpose."""


class InputError(HessfreeError, ValueError):
    """Bad input detected before any expensive work started."""


class CheckpointMismatchError(InputError):
    """A checkpoint's keys or shapes do not match the model."""


class ParameterSelectionError(InputError):
    """The requested parameter selection names nothing, or names frozen / unknown parameters."""


class LabelError(InputError):
    """Labels have the wrong dtype, shape or range for the loss."""


class NonFiniteError(HessfreeError, FloatingPointError):
    """A loss or gradient is NaN or infinite; the message names the sample id."""


class RunDirectoryError(HessfreeError, FileExistsError):
    """A run directory is missing, incomplete, or would be overwritten."""


class RunIntegrityError(RunDirectoryError):
    """A run's files do not match what its manifest recorded (checksum, size, path or value)."""


class DatasetMismatchError(InputError):
    """The dataset passed is not the one the run was trained on."""
