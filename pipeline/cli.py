"""How every command-line tool ends on bad input: one line on stderr that says what is wrong and
what to do, and a nonzero exit status. The traceback shows only under the one debug switch that
every tool honours the same way: `SLIP_DEBUG=1` in the environment, or `--debug` anywhere on the
command line (which sets SLIP_DEBUG=1 for the processes the tool starts). Any other exception is
a bug and keeps its traceback, except a missing or unreadable file, which is one line too.

Every entry point (tools/*.py, trainer/run.py) ends with

    if __name__ == "__main__":
        sys.exit(run_main(main))

and a tool that handles an error itself (to choose its exit status) ends with `return report(e, code)`.

In a distributed run every rank usually meets the same bad input: rank 0 prints the line. Another
rank prints its own line only after a grace period, so that a failure of that rank alone is still
reported, while a shared one, which the launcher (torchrun, srun) ends as soon as rank 0 exits,
is printed once.
"""
from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from typing import Callable, Sequence

DEBUG_ENV = "SLIP_DEBUG"
DEBUG_FLAG = "--debug"
OTHER_RANK_GRACE_S = 10.0     # time for rank 0 to print the shared line and the launcher to end the rest

# Errors that say the input or the state on disk cannot be used, never a bug: (module, class). Only
# a class whose module is loaded can have been raised, so none of these modules is imported here.
INPUT_ERRORS = (
    ("pipeline.manifest", "ShardError"), ("pipeline.metadata", "InputError"), ("pipeline.build", "BuildError"),
    ("pipeline.regular_files", "RefusedFile"), ("trainer.checkpoint", "CheckpointError"),
    ("trainer.resume", "ResumeError"), ("trainer.dataclass_io", "ConfigError"), ("trainer.run_dir", "RunDirBusy"),
    ("trainer.convert.mapping", "ConversionError"), ("trainer.policies", "NonFiniteLossError"),
)

PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def input_error_types() -> tuple[type, ...]:
    types = []
    for module, name in INPUT_ERRORS:
        if module in sys.modules:
            types.append(getattr(sys.modules[module], name))
    return tuple(types)


def _rank() -> int:
    for name in ("RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def report(error: BaseException, code: int = 2, kind: str = "error", rank: int | None = None,
           message: str | None = None) -> int:
    """Print `kind: message` (the error's own text by default) as one line, the traceback before it
    under the debug switch, and return `code` for the tool to exit with."""
    rank = _rank() if rank is None else rank
    if debug_enabled():
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    elif rank != 0:
        try:      # the launcher's SIGTERM, sent once rank 0 has exited, ends the wait at once
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        except ValueError:       # not the main thread
            pass
        time.sleep(OTHER_RANK_GRACE_S)
    text = one_line(message if message is not None else error)
    print(f"{kind}: {text}" if rank == 0 else f"{kind} (rank {rank}): {text}", file=sys.stderr, flush=True)
    return code


def run_main(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a tool's `main(argv)` with the debug switch taken off its arguments, and an input error
    that escaped it turned into one line and exit status 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    if DEBUG_FLAG in args:
        args = [a for a in args if a != DEBUG_FLAG]
        os.environ[DEBUG_ENV] = "1"
    try:
        return main(args) or 0
    except Exception as e:
        if isinstance(e, input_error_types()):
            return report(e, 2)
        if isinstance(e, PATH_ERRORS) and e.filename is not None:     # a path the user named, most likely
            return report(e, 2, message=f"{e.filename}: {e.strerror}")
        raise

