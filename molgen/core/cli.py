"""One way to run a module's absl command line, from a shell or from Python.

Each module CLI defines its flags in `define(flag_values)`, called only when it runs, since
several modules share flag names (`--workdir`, `--out`) and one process may import them all.
From a shell the flags go on absl's global set, so `--help` and `--helpfull` work; from Python
(`main(["--workdir=x"])`, the tests) they go on a private set. Either way an unexpected
positional argument is a usage error, absl's own INFO chatter (Orbax, TFDS) is turned down as in
molgen.main, and an expected error (`errors`, e.g. a missing workdir) ends the run with one line
naming the tool instead of a traceback.
"""

from __future__ import annotations

from typing import Callable

from absl import app, flags
from absl import logging as absl_logging


def run(
    name: str,
    define: Callable,
    cli: Callable,
    argv: list[str] | None = None,
    *,
    positional: int = 0,
    errors: tuple = (FileNotFoundError,),
) -> None:
    """`cli(flag_values, argv)` with the flags `define` adds: parsed from `sys.argv` under
    `app.run` when `argv` is None, else from `argv` (without the program name). `positional`:
    how many arguments may follow the program name (e.g. a subcommand)."""

    def guarded(fv, args):
        if len(args) > 1 + positional:
            raise app.UsageError(f"unexpected arguments: {args[1 + positional :]}")
        absl_logging.set_verbosity(absl_logging.WARNING)  # app.run sets INFO
        try:
            cli(fv, args)
        except errors as e:
            raise SystemExit(f"{name}: {e}") from None

    if argv is None:
        define(flags.FLAGS)
        app.run(lambda args: guarded(flags.FLAGS, args))
        return
    fv = define(flags.FlagValues())
    guarded(fv, fv([name, *argv]))
