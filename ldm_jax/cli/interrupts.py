"""Ctrl-C that is never lost: a KeyboardInterrupt that Python drops is delivered to the main thread again.

Python runs a signal's handler at the main thread's next bytecode. When that bytecode belongs to a garbage-collector
callback (JAX registers `_xla_gc_callback`, which runs often while XLA compiles), a finalizer (`__del__`) or a weakref
callback, the KeyboardInterrupt cannot propagate: Python prints "Exception ignored in ..." and carries on, so a Ctrl-C
during a compile was sometimes ignored and the command ran to the end (exit 0).

`redeliver_dropped_interrupts()` installs a `sys.unraisablehook` that, for a dropped KeyboardInterrupt only, prints
nothing and interrupts the main thread again a moment later (`_thread.interrupt_main`, which goes through the installed
SIGINT handler, so training's InterruptGuard still holds it inside its critical blocks). Every other unraisable error
goes to the previous hook.
"""

from __future__ import annotations

import _thread
import contextlib
import sys
import threading

REDELIVER_AFTER_S = 0.05  # from a helper thread: the hook's own bytecode would drop it again


@contextlib.contextmanager
def redeliver_dropped_interrupts():
    """While active, a dropped KeyboardInterrupt is raised again in the main thread. One still waiting when the block
    ends without an error is raised as the block ends (the user did press Ctrl-C)."""
    previous, timers = sys.unraisablehook, []

    def hook(unraisable):
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            timer = threading.Timer(REDELIVER_AFTER_S, _thread.interrupt_main)
            timer.daemon = True
            timers.append(timer)
            timer.start()
        else:
            previous(unraisable)

    sys.unraisablehook = hook
    failed = True
    try:
        yield
        failed = False
    finally:
        sys.unraisablehook = previous
        waiting = [t for t in timers if t.is_alive()]
        for t in waiting:
            t.cancel()
    if waiting and not failed:
        raise KeyboardInterrupt
