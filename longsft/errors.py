"""One error type for user mistakes and one exit status across every CLI of the toolkit.

A mistake in the settings, the inputs or a model folder is a `UserError` (or a `SystemExit` carrying its
message, as main.py's start-up checks raise): the CLIs print it as one `error: ...` paragraph, without a traceback,
and exit with `EXIT_USER_ERROR` (2, the status argparse gives a bad command line). Anything else is a bug and
keeps its traceback. Standard library only: pre-tokenization and packing import this without torch.

    python -c "import errors; errors.run_cli(lambda: (_ for _ in ()).throw(errors.UserError('demo')))"; echo $?  # 2
"""

from __future__ import annotations

import sys
from typing import Any, Callable

EXIT_USER_ERROR = 2  # patch/install.py (a leaf that imports nothing from here) uses the same value


class UserError(ValueError):
    """A mistake the user can fix (all problems found in one message, naming the setting or file to change)."""


def run_cli(main: Callable[..., Any], *args: Any) -> Any:
    """Run an entry script's main(); a user mistake becomes `error: ...` on stderr and exit status 2."""
    try:
        return main(*args)
    except UserError as e:
        message = str(e)
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        message = e.code
    print(message if message.startswith("error: ") else f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)
