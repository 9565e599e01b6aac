"""The one top-level handler of the ``metalora`` command line: how a run ends.

- success: exit 0;
- an expected error (bad value, missing or unreadable file, refused output, full disk...): one
  ``metalora CMD: error: ...`` line naming the value and the fix, exit 2;
- Ctrl-C: one line, exit 130; SIGTERM: one line, exit 143. Atomic writes remove their temp file
  on the way out, so nothing half-written is left and finished files stay complete;
- anything else is a bug: its traceback, then one line saying so, exit 1.

``--debug`` prints the traceback in every case (the exit code stays the same).

The Ctrl-C handler installed here also records the Ctrl-C (``cli.interrupt``), so one that Python
drops inside a destructor still stops the run at its next step.
"""
from __future__ import annotations

import argparse
import errno
import signal
import sys
import threading
import traceback
from typing import Any

from ..formats.files import Terminated, terminate_on_sigterm
from .interrupt import CTRL_C, on_ctrl_c

EXIT_OK, EXIT_BUG, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143

EXPECTED = (ValueError, FileNotFoundError, FileExistsError, RuntimeError, OSError)

_OS_HINTS = {
    errno.ENOSPC: "the disk is full; free some space and run again",
    errno.EDQUOT: "the disk quota is used up; free some space and run again",
    errno.EACCES: "permission denied; choose a path you can write to",
    errno.EPERM: "permission denied; choose a path you can write to",
    errno.EROFS: "the file system is read-only; choose a writable folder",
    errno.ENAMETOOLONG: "choose a shorter name",
    errno.EISDIR: "that is a folder; give a file name",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
}

_RESUME_HINT = {"meta-train": "; run it again with --resume to continue from the last checkpoint"}


def error_message(e: BaseException) -> str:
    """One line for an expected error: its message, or for an OSError the path and a fix."""
    if isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, FileExistsError)) and e.errno in _OS_HINTS:
        where = f"{e.filename}: " if e.filename else ""
        text = f"{where}{e.strerror or e}; {_OS_HINTS[e.errno]}"
    elif isinstance(e, FileNotFoundError) and not e.args[1:] and e.args:
        text = str(e.args[0])
    elif isinstance(e, OSError) and e.filename and e.strerror:
        text = f"{e.filename}: {e.strerror}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())  # one line


def run_command(args: argparse.Namespace) -> tuple[int, Any]:
    """Runs ``args.func(args)`` under the rules above; returns (exit code, the command's result)."""
    cmd = getattr(args, "command", "") or ""
    debug = bool(getattr(args, "debug", False))
    name = f"metalora {cmd}".strip()
    previous = signal.getsignal(signal.SIGTERM)
    previous_int = None  # Ctrl-C left alone where it is ignored (a background job) or handled by a host
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        previous_int = signal.signal(signal.SIGINT, on_ctrl_c)
    CTRL_C.clear()
    terminate_on_sigterm()
    try:
        return EXIT_OK, args.func(args)
    except (KeyboardInterrupt, Terminated) as e:
        if debug:
            traceback.print_exc()
        how, code = (("interrupted (Ctrl-C)", EXIT_INTERRUPTED) if isinstance(e, KeyboardInterrupt)
                     else ("terminated (SIGTERM)", EXIT_TERMINATED))
        print(f"{name}: {how}; files already finished are complete and nothing half-written "
              f"was left{_RESUME_HINT.get(cmd, '')}", file=sys.stderr)
        return code, None
    except EXPECTED as e:
        if debug:
            traceback.print_exc()
        print(f"{name}: error: {error_message(e)}", file=sys.stderr)
        return EXIT_ERROR, None
    except Exception as e:  # a bug: show where it happened
        traceback.print_exc()
        print(f"{name}: internal error ({type(e).__name__}: {' '.join(str(e).split())}); this is a bug, "
              "please report it with the traceback above", file=sys.stderr)
        return EXIT_BUG, None
    finally:
        CTRL_C.clear()
        if previous_int is not None:
            signal.signal(signal.SIGINT, previous_int)
        if previous is not None:
            try:
                signal.signal(signal.SIGTERM, previous)
            except ValueError:  # not the main thread
                pass
