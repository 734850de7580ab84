"""Typed errors raised by the library.

The library never prints and never exits: it raises one of these, and the CLI
turns it into a single line on stderr and a non-zero exit code.
"""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """How an error shows in one line: the first non-blank line of its message, or the
    name of its type when it has none."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


class MMSearchError(Exception):
    """Base class of every error mmsearch raises on purpose."""

    exit_code = 1


class UsageError(MMSearchError):
    """The caller asked for something that makes no sense (empty query, k < 0...)."""

    exit_code = 2


class TrainingError(UsageError):
    """An approximate index type cannot be trained on the vectors at hand (too few)."""


class IndexNotFoundError(MMSearchError):
    """The named index does not exist under the data directory."""


class EmptyIndexError(MMSearchError):
    """The index exists but holds nothing of the kind searched."""


class ModelError(MMSearchError):
    """The model could not be resolved, downloaded or loaded."""


class ModelMismatchError(MMSearchError):
    """The index was built with another model than the one asked for."""


class DecodeError(MMSearchError):
    """A file could not be read as an image; the message says why."""


class CorruptIndexError(MMSearchError):
    """The catalog or the vector file is damaged and cannot be served."""


class IndexLockedError(MMSearchError):
    """Another process is writing to this index."""


class StorageError(MMSearchError):
    """Writing the index failed (disk full, read-only directory...)."""


class DatasetError(MMSearchError):
    """An evaluation dataset is missing, malformed or empty."""


class ClusterError(MMSearchError):
    """The Ray cluster of a distributed run cannot be reached, or its work failed."""
