"""User-input errors and the one entry point every console script goes through.

A mistake in what the user gave (config field, weights file, dataset path, corpus, tokenizer, checkpoint) is a
``UserError``: the command prints one line naming the file or field and exits 2. Anything else is a bug and keeps
its traceback (exit 1). ``--debug`` on any command (or ``MEGADOREMI_DEBUG=1``) shows the traceback of a user
error too.
"""

import os
import sys
import traceback

# Exit statuses shared by every command (documented in docs/reliability.md).
EXIT_OK = 0
EXIT_BUG = 1  # an unexpected exception: a traceback follows
EXIT_USAGE = 2  # a user-input error: one line on stderr
EXIT_DIVERGED = 3  # a training run stopped because its loss or gradient norm became non-finite
EXIT_REQUEUE = 75  # checkpointed after SIGUSR1/SIGTERM: "not finished, run me again" (sysexits' EX_TEMPFAIL)


class UserError(Exception):
    """A problem with the user's input; the message names the file, line, field or value."""


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """Whether ``--debug`` is in ``argv`` (or MEGADOREMI_DEBUG=1), and ``argv`` without it."""
    rest = [a for a in argv if a != "--debug"]
    return len(rest) != len(argv) or os.environ.get("MEGADOREMI_DEBUG", "") not in ("", "0"), rest


def report_user_error(prog: str, error: BaseException, debug: bool = False) -> int:
    """Print ``prog: error: MESSAGE`` (with the traceback when ``debug``); returns EXIT_USAGE."""
    if debug:
        traceback.print_exception(error)
    message = str(error) or type(error).__name__
    print(f"{prog}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def run_cli(prog: str, main, argv=None) -> int:
    """Call ``main(argv)`` (``--debug`` removed) and turn a UserError into one line and exit status 2."""
    debug, argv = debug_requested(sys.argv[1:] if argv is None else list(argv))
    try:
        return main(argv)
    except UserError as error:
        return report_user_error(prog, error, debug)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
