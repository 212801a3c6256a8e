"""Exception hierarchy of the CAI helpers.

Every error the package raises on purpose derives from :class:`CAIError`, so a
notebook or a Lambda handler can catch the package's errors apart from bugs.
Messages name the offending file, partition, object or peer and state the fix.
"""


class CAIError(Exception):
    """Base class of every error raised on purpose by ``cai_helpers``."""


class InvalidParameterError(CAIError, ValueError):
    """A run, model or data parameter is out of range or of the wrong kind."""


class DataFormatError(CAIError, ValueError):
    """A data file (data set shard, partition, manifest, catalog) is malformed."""


class ChecksumError(DataFormatError):
    """A file's sha256 or size does not match the manifest that lists it."""


class UnsafePickleError(CAIError):
    """A pickled file asked for a global outside the loader's allow-list."""


class CheckpointError(CAIError):
    """Model weights are missing, unexpected, mis-shaped or unreadable."""


class StoreError(CAIError):
    """A local-folder or S3 store operation failed."""


class InvalidKeyError(StoreError, ValueError):
    """A store key is not a safe relative path inside the store's root."""


class ObjectNotFoundError(StoreError, KeyError):
    """A key does not exist in the store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class StoreUnavailableError(StoreError):
    """The store stayed unreachable after every retry."""


class FMIError(CAIError):
    """A communicator operation failed."""


class FMITimeoutError(FMIError, TimeoutError):
    """A peer did not respond within the operation's timeout."""


class FMIPeerLostError(FMITimeoutError):
    """A peer closed its connection or died before an operation finished.

    It derives from FMITimeoutError because a caller handles a dead peer like a
    silent one. It is raised at once instead of after the timeout.
    """


class DeploymentError(CAIError):
    """A cloud deployment (stack, bundle) is missing, incomplete or too large."""


class RunFailedError(CAIError):
    """A cloud run ended in a state other than success, or did not end in time."""


class ToleratedFailureExceededError(CAIError):
    """More partitions of a fan-out run failed than its tolerated failure percentage allows."""


class NotebookFailedError(CAIError):
    """A notebook of the main job raised an error while papermill executed it."""
