"""Errors that poisonlab reports to a user as one line (the CLI exits with code 2).

Raise one of these at every boundary where input from outside (a file, a config value, a
command-line argument) can be wrong. The message names the bad file, key or value.
"""

import os
import stat
import unicodedata


def printable(text: str) -> str:
    """`text` with its control and format characters (newlines, ANSI escapes, bidirectional
    overrides: from a folder or file name, say) and lone surrogates (a Latin-1 byte of a file
    name, which no terminal encoding can print) written as escapes, so it prints as it is."""
    return "".join(c.encode("unicode_escape").decode("ascii")
                   if unicodedata.category(c) in ("Cc", "Cf", "Cs") else c for c in text)


class PoisonlabError(Exception):
    """Base class: a user-facing problem, printed as a single line without a traceback."""


class ConfigError(PoisonlabError, ValueError):
    """An invalid configuration value, unknown key or impossible parameter."""


class ShapeError(PoisonlabError, ValueError):
    """Tensors or a model whose shapes or state do not fit together (a caller's mistake, not a
    configuration value): wrong dimensions, lengths that differ, an empty batch."""


class DataError(PoisonlabError, ValueError):
    """A missing, corrupt or malformed data set, or an impossible request on one."""


class ModelFileError(PoisonlabError, ValueError):
    """A model file that cannot be loaded safely or does not fit the architecture."""


class DownloadError(PoisonlabError):
    """A download that failed or whose checksum did not match."""


class RunError(PoisonlabError):
    """An unknown run id, or a run directory that cannot be used."""


def require_regular_file(path: "os.PathLike[str] | str") -> None:
    """OSError unless `path` (symlinks followed) is a regular file: opening a FIFO blocks until
    someone writes to it, a device such as /dev/zero never ends. Every reader of a user's file
    calls this before opening it, inside its own error handling."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError("not a regular file (a FIFO, socket or device?)")
