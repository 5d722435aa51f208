"""One way to run a module's absl command line, from a shell or from Python.

Each module CLI defines its flags in `define(flag_values)`, called only when it runs, since
several modules share flag names (`--workdir`, `--out`) and one process may import them all.
From a shell the flags go on absl's global set, so `--help` and `--helpfull` work; from Python
(`main(["--workdir=x"])`, the tests) they go on a private set.
"""

from __future__ import annotations

from typing import Callable

from absl import app, flags


def run(name: str, define: Callable, cli: Callable, argv: list[str] | None = None) -> None:
    """`cli(flag_values, argv)` with the flags `define` adds: parsed from `sys.argv` under
    `app.run` when `argv` is None, else from `argv` (without the program name)."""
    if argv is None:
        define(flags.FLAGS)
        app.run(lambda args: cli(flags.FLAGS, args))
        return
    fv = define(flags.FlagValues())
    cli(fv, fv([name, *argv]))
