"""The exceptions dogbread raises on purpose. The CLI turns each into one line and exit code 2."""


class DogbreadError(Exception):
    """A problem the user can fix: bad config, missing input, unreadable model."""


class ConfigError(DogbreadError):
    """An unknown key, a wrong type or an impossible value in a config or on the command line."""


class DataError(DogbreadError):
    """Input data that cannot be used: a missing path, an empty tree, a single class."""


class ModelError(DogbreadError):
    """A model that cannot be loaded or does not match the config."""


class StorageError(DogbreadError):
    """An input or output location that cannot be reached, read or written."""


class ClusterError(DogbreadError):
    """A Ray cluster that cannot be reached or joined."""


def first_line(exc: BaseException) -> str:
    """An exception's message for a one-line error: its first line, or its type's name."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
