"""The errors a user can cause. The CLI prints each as one line and exits with code 2.

Every message names the file or config key at fault and what was expected, e.g.
``stages.gan.alpha1: expected float >= 0, got 'abc'``.
"""


def one_line(text: str) -> str:
    """``text`` as one printable line: whitespace runs become one space, and control characters or
    lone surrogates (a non-UTF-8 byte in argv, a ``\\ud800`` escape in YAML) are written as escapes,
    so the line can neither break in two nor fail to print."""
    text = " ".join(str(text).split())
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class NeuroimagenError(Exception):
    """Base class for errors caused by user input (files, config, arguments, output location)."""

    exit_code = 2

    def __init__(self, message: str):
        # One line: newlines would break the "one clear line" contract of the CLI.
        super().__init__(one_line(message))


class ConfigError(NeuroimagenError):
    """A config file, a ``--set`` override or a search space is invalid."""


class DataError(NeuroimagenError):
    """A data file (EEG, splits, images, captions) is missing, unreadable or inconsistent."""


class OutputError(NeuroimagenError):
    """An output location cannot be written (exists, unwritable, disk full)."""
