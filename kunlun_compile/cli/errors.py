"""What the CLI checks before it starts a long compile, and how it names what is wrong.

A `CliError` is a problem with what the person asked for: the CLI prints its message as one line
(no traceback unless --verbose), or as a JSON object under --json.
"""
from __future__ import annotations

import argparse
import os
import tempfile


class CliError(Exception):
    """What the user gave cannot work; the message says what and how to fix it."""


class UsageError(CliError):
    """argparse's complaint about the command line (raised instead of argparse's own exit)."""

    def __init__(self, parser: argparse.ArgumentParser, message: str):
        super().__init__(message)
        self.parser = parser


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def check_writable_file(path: str, option: str) -> None:
    """Fail now, before a compile, if `path` cannot be written (a missing directory, a directory in
    its place, no permission, a read-only file system)."""
    if os.path.isdir(path):
        raise CliError(f"{option} {path}: is a directory; give a file name")
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise CliError(f"{option} {path}: cannot write there: {e.strerror or e}") from e
    if not existed:
        os.remove(path)


def write_text(path: str, text: str, option: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        raise CliError(f"{option} {path}: cannot write there: {e.strerror or e}") from e


def check_writable_dir(path: str, what: str) -> None:
    """Create `path` if needed and make sure a file can be written in it."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise CliError(f"{what} {path}: cannot write there: {e.strerror or e}") from e
