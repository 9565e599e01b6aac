"""Ctrl-C that cannot be lost (standard library only: the command line's ``--help`` loads it).

Python drops an exception raised inside a destructor or a weakref callback ("Exception ignored
in ..."), so a Ctrl-C that lands there would be lost and a long run would go on. ``on_ctrl_c``
(installed by ``cli.errors.run_command``) also records the Ctrl-C; the training loops' step
callbacks call ``raise_if_interrupted`` and stop at the next step.
"""
from __future__ import annotations

import threading
from typing import Any

CTRL_C = threading.Event()  # set by ``on_ctrl_c``


def on_ctrl_c(signum: int, frame: Any) -> None:
    CTRL_C.set()
    raise KeyboardInterrupt


def raise_if_interrupted() -> None:
    """Raises KeyboardInterrupt when a Ctrl-C came while ``run_command`` ran (even one that Python
    dropped because it landed in a destructor)."""
    if CTRL_C.is_set():
        raise KeyboardInterrupt
