"""One error type for user mistakes and one exit status across every CLI of the toolkit.

A mistake in the settings, the inputs or a model folder is a `UserError` (or a `SystemExit` carrying its
message, as main.py's start-up checks raise): the CLIs print it as one `error: ...` paragraph, without a traceback,
and exit with `EXIT_USER_ERROR` (2, the status argparse gives a bad command line). Anything else is a bug and
keeps its traceback. A problem every rank of a multi-process run finds alike (`same_on_every_rank`) is printed
once, by global rank 0. Standard library only: pre-tokenization and packing import this without torch.

    python -c "import errors; errors.run_cli(lambda: (_ for _ in ()).throw(errors.UserError('demo')))"; echo $?  # 2
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable

EXIT_USER_ERROR = 2  # patch/install.py (a leaf that imports nothing from here) uses the same value


class UserError(ValueError):
    """A mistake the user can fix (all problems found in one message, naming the setting or file to change)."""

    same_on_every_rank = False  # True: every rank of a multi-process run finds it; global rank 0 alone prints it


QUIET_RANK_DELAY_S = 3.0  # how long the other ranks wait before they exit: rank 0's message gets out first


def same_on_every_rank(message: str) -> UserError:
    """A UserError that every rank of a multi-process run finds the same way (it follows from the settings, the
    model config or the data they all read): run_cli prints it on global rank 0 only; the other ranks exit with the
    same status without a word, a moment later, so a launcher that stops the job when a rank exits cannot cut rank
    0's message short."""
    e = UserError(message)
    e.same_on_every_rank = True
    return e


def global_rank() -> int:
    """This process's rank as torchrun / the deepspeed launcher set it (0 when not launched by one)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def run_cli(main: Callable[..., Any], *args: Any) -> Any:
    """Run an entry script's main(); a user mistake becomes `error: ...` on stderr and exit status 2."""
    try:
        return main(*args)
    except UserError as e:
        message = str(e)
        if e.same_on_every_rank and global_rank() != 0:
            time.sleep(QUIET_RANK_DELAY_S)
            sys.exit(EXIT_USER_ERROR)
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        message = e.code
    print(message if message.startswith("error: ") else f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)
