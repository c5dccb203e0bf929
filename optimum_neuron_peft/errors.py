"""Exceptions raised for user errors.

Every user-facing error is a subclass of ``ValueError`` whose message says what was found, what was expected and,
where it helps, what to do. The CLI turns them into one line on stderr and a non-zero exit.
"""


class OptimumNeuronPeftError(ValueError):
    """Base class of every user error raised by this package."""


class SpecError(OptimumNeuronPeftError):
    """A weight transformation spec cannot be built or applied (bad head counts, multiplier, shapes...)."""


class CheckpointError(OptimumNeuronPeftError):
    """A checkpoint on disk is missing, incomplete, corrupted or inconsistent with its metadata."""


class UnsafePickleError(CheckpointError):
    """A pickle tried to load something outside the small set of objects the format needs."""


class ConfigError(OptimumNeuronPeftError):
    """A model or PEFT configuration is not supported or does not match the model."""


class MergeError(OptimumNeuronPeftError):
    """Adapters or weights cannot be combined or merged as asked."""


class OutputDirError(OptimumNeuronPeftError):
    """An output directory cannot be written as asked: not empty without overwrite, overlapping an input..."""


class OutputBusyError(OutputDirError):
    """Another run holds the lock of this output directory."""
