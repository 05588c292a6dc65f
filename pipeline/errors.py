"""Every error the pipeline raises on purpose (and :data:`Log`, where what the user reads goes): the bottom floor,
imported by every other module, importing none.

Every message names the thing at fault and the fix, so a failed Ray job's log (or the console) is enough to act
on. ``run_pipeline.py`` turns a :class:`PipelineError` or :class:`DataError` into one line on stderr and exit 2.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

#: where a message for the user goes (``print`` by default; a test passes a list's ``append``): the one alias of it
Log = Callable[[str], Any]

#: The command that (re)writes shards; quoted in every "run this to fix it" message.
SHARDS_COMMAND = "python run_pipeline.py mode=shards"


class PipelineError(RuntimeError):
    """A problem with the run's configuration or environment, explained for the user (no traceback needed)."""


class TrackingUnreachable(PipelineError):
    """The tracking server stayed unreachable past ``tracking.outage_s``: names the URI. Nothing can be logged
    meanwhile, so whoever catches it keeps its work locally instead of closing runs it cannot reach."""


class Stopped(Exception):
    """The driver was asked to stop (SIGINT, SIGTERM) and did: nothing is left RUNNING. ``run_pipeline.py`` prints
    the message (what finished, the command that resumes) and exits 128 + the signal's number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class DataError(Exception):
    """Base class of every error this package raises on purpose."""


class SourceNotFoundError(DataError, FileNotFoundError):
    """A data source's files are not where the config says (or where we looked by default)."""


class UnknownNameError(DataError, ValueError):
    """A name (source kind, benchmark kind, class, task, superclass) that is not one of the valid ones."""


class ConfigError(DataError, ValueError):
    """A benchmark config that cannot describe a valid task sequence."""


class UnsafeInputError(ConfigError):
    """Input read from data (a pickle in a source folder, a manifest's or task.json's shard path, a catalogue line)
    that would run code, reach a shell or leave its root if used as given: refused before use, naming the input.
    Data never becomes code: only the config itself may name a command (a ``pipe:`` shard root)."""


class ShardCorruptError(DataError):
    """A shard whose bytes do not match its manifest (or that is missing or unreadable)."""


class ShardWriteError(DataError, OSError):
    """Shards could not be written (disk full, read-only folder): names the task, the path, the errno and the fix."""


def unknown_name(what: str, name: object, valid: Iterable[object]) -> UnknownNameError:
    """Build the error for a name that is not one of ``valid``; the message lists the valid names."""
    listed = ", ".join(repr(v) for v in valid)
    return UnknownNameError(f"unknown {what} {name!r}; valid: {listed}")


def corrupt_shard(url: str, why: str) -> ShardCorruptError:
    """Build the error for a bad shard: which one, why, and the command that rewrites it."""
    return ShardCorruptError(f"shard {url} is corrupt ({why}); delete it and run `{SHARDS_COMMAND}`")


def missing_shard(url: str) -> ShardCorruptError:
    """Build the error for a shard listed in the manifest that is not there."""
    return ShardCorruptError(f"shard {url} is missing; run `{SHARDS_COMMAND}` to write it")
