"""The errors kdcache raises for things a user can fix.

Every one carries a single line that says what is wrong and what to do; the
command line turns them into a non-zero exit without a traceback.
"""


class KdcacheError(Exception):
    """A user-facing error: bad names, missing files, mismatched stores."""


class UnknownNameError(KdcacheError):
    """A model, data set, recipe or method name that is not registered."""


class CheckpointError(KdcacheError):
    """A checkpoint that cannot be read or does not fit the model."""


class DatasetError(KdcacheError):
    """A data set that is missing on disk or malformed."""


class StoreError(KdcacheError):
    """A plan or teacher store that is missing, incomplete, damaged or locked."""


class UnfinishedCreationError(StoreError):
    """A plan or store whose creation was cut short: nothing in it is usable, and re-running its precompute
    makes it afresh."""


class ArgumentError(KdcacheError):
    """A library call's argument of the wrong type or out of range; the line names the argument, the value given
    and what is valid. Also a TypeError or ValueError (its two subclasses), as Python's own calls raise."""


class ArgumentTypeError(ArgumentError, TypeError):
    """An argument of the wrong type: a str where a list of ids goes, a float or bool where an integer goes."""


class ArgumentValueError(ArgumentError, ValueError):
    """An argument of the right type but outside its range: an epoch before the first, a batch size of 0."""
