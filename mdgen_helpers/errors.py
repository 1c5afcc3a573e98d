"""Errors the user can act on. The CLI prints their message (no traceback) and exits with code 2."""


class MdgenError(ValueError):
    """Bad input or state that the user can fix; the message says what and how."""


class DataError(MdgenError):
    """The data set (folders, images) cannot be used as given."""


class SplitMismatchError(MdgenError):
    """A persisted split does not match the files on disk or the artifact that uses it."""


class CheckpointError(MdgenError):
    """A checkpoint file is of the wrong kind, incomplete, or unsafe to load."""


class ArtifactMismatchError(MdgenError):
    """Two artifacts that must agree (tokenizer, users, split, statistics) do not."""
