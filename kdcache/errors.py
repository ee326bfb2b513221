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
