"""User-facing errors: reported in one line by the CLI with exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint). The message names the key, file or field."""


def not_utf8(path, e: UnicodeDecodeError) -> UserError:
    """The one-line error for a text file that does not decode as UTF-8."""
    return UserError(f"{path}: not UTF-8 text (undecodable byte at offset {e.start})")


# Set by the `memlm` command (cli.main without argv): library code may then silence file descriptor 2 for the rest
# of the process after a failure whose native threads would print tracebacks, keeping the original descriptor here
# for the one-line error (checkpoint._native_stderr_held). Never set in a caller's own process.
AS_COMMAND = False
COMMAND_STDERR_FD: int | None = None


class TrainingDiverged(Exception):
    """The training loss became NaN/inf. The CLI reports it in one line with exit code 1; the checkpoints
    written before the divergence are kept and the diverged state is not saved."""


class NonFiniteOutput(ValueError):
    """The model produced NaN/inf where an evaluation needs a number (a token NLL). The CLI reports it in one
    line with exit code 1; results written before it (finished PG-19 books) are kept."""


# Appended to NonFiniteOutput messages: the one known way a trained model here produces NaN on valid input.
DIVERGENCE_HINT = ("a Titans memory's chunked inner update can diverge on a long stream or a run of identical tokens; "
                   "model.titans.inner_grad_clip > 0 bounds it")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (anything else is argparse's one-line usage error, exit code 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse with the CLI's error contract: a usage error is one line (`PROG: error: MESSAGE (see PROG
    --help)`) on stderr and exit code 2, without the usage block argparse prints first. Sub-commands made with
    add_parser inherit the class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def run_script(main: Callable[[], int | None], prog: str) -> int:
    """A script's main() with the memlm CLI's contract: a UserError is one line on stderr and exit code 2."""
    try:
        return int(main() or 0)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


def check_output_file(path: str, flag: str, force: bool = False) -> None:
    """Refuse, before any work, an output FILE path that would destroy something: an existing file (unless
    `force`: the user asked to replace it), a directory, or a parent that is a file."""
    if os.path.isdir(path):
        raise UserError(f"{flag} {path}: is a directory; give a file path")
    if os.path.lexists(path) and not force:
        raise UserError(f"{flag} {path}: already exists (pass --force to overwrite it)")
    _check_nearest_parent(path, flag)


def check_output_dir(path: str, flag: str) -> None:
    """Refuse an output DIRECTORY path that names an existing file (results and resumable state go inside it)."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path}: is a file, not a directory")
    _check_nearest_parent(path, flag)


def _check_nearest_parent(path: str, flag: str) -> None:
    """The nearest existing ancestor of path (what makedirs would build under) must be a directory."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"{flag} {path}: {parent} is a file, not a directory")
