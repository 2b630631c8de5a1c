"""What a training run reports while it runs, and how Ctrl-C stops it cleanly.

- `Metrics`: RUN_DIR/metrics.jsonl (one JSON object per step, process 0 only) and TensorBoard when `tensorboardX`
  is importable; the files are opened at the first row, so a run that fails before its first step leaves none.
- `progress_bar`: tqdm on a terminal; a terminal that reports no size (0 x 0: `script`, some CI ptys) gets a fixed
  one, where tqdm would print an empty bar. Off a terminal (a log file, `nohup`), where a bar would be a stream of
  carriage returns, a plain line every `LINE_SECONDS` and at the last step instead.
- `InterruptGuard`: a Ctrl-C (SIGINT) that arrives inside `guard.critical()` is held until the block ends and then
  raised as KeyboardInterrupt, so the loop's state, step counter, data position and metrics rows are always updated
  together; elsewhere (compiling, sampling, loading data) it raises at once.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

from tqdm.auto import tqdm


class Metrics:
    """metrics.jsonl (and TensorBoard) of RUN_DIR, written only where `enabled` (process 0)."""

    def __init__(self, run_dir: str, enabled: bool):
        self.run_dir, self.enabled = run_dir, enabled
        self.file = self.tb = None

    def _open(self) -> None:
        os.makedirs(self.run_dir, exist_ok=True)
        self.file = open(os.path.join(self.run_dir, "metrics.jsonl"), "a", encoding="utf-8")
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(self.run_dir, "tensorboard"))
        except ImportError:
            pass

    def keep_until(self, step: int) -> None:
        """On resume from checkpoint `step`: drop the rows of later steps, which a crashed run wrote after its last
        checkpoint (the resumed run writes them again)."""
        path = os.path.join(self.run_dir, "metrics.jsonl")
        if not self.enabled or not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
        kept = [ln for ln in lines if _step_of(ln) is None or _step_of(ln) <= step]
        if len(kept) < len(lines):
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.writelines(kept)
            os.replace(path + ".tmp", path)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        if self.file is None:
            self._open()
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


LINE_SECONDS = 30.0  # off a terminal: at most one progress line per this many seconds


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def progress_bar(total: int, initial: int, enabled: bool):
    """Progress of optimiser steps on stderr (see the module docstring); nothing when not `enabled`. The result has
    tqdm's `update(n)`, `set_postfix(**values, refresh=)` and `close()`."""
    if enabled and not _is_terminal(sys.stderr):
        return _Lines(total, initial)
    try:
        width = os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError, AttributeError):
        width = 0
    size = {"dynamic_ncols": True} if width else {"ncols": 100, "nrows": 50}  # nrows 0: tqdm prints nothing
    return tqdm(total=total, initial=initial, unit="step", desc="train", disable=None if enabled else True, **size)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _Lines:
    """`train: step 120/1000 (12%), loss=0.1234, img_s=3.10, 0:01:02 elapsed, 0:07:40 left` lines."""

    def __init__(self, total: int, initial: int):
        self.total, self.n, self.first = total, initial, initial
        self.postfix, self.start = {}, time.monotonic()
        self.last = self.start
        self.timed = None  # (time, step) of the first update: the rate is measured from there

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.postfix = values

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= LINE_SECONDS or self.n >= self.total or self.timed is None:
            self.last = now
            # the first update's row is read when the next step is queued: the time to it says nothing about the
            # rate, so the first line has no estimate and later ones count the steps after it
            t0, n0 = self.timed or (now, self.n)
            self.timed = (t0, n0)
            left = (f", {_clock((now - t0) / (self.n - n0) * (self.total - self.n))} left" if self.n > n0
                    else ", 0:00:00 left" if self.n >= self.total else "")
            values = "".join(f", {k}={v}" for k, v in self.postfix.items())
            print(f"train: step {self.n}/{self.total} ({100 * self.n // max(self.total, 1)}%){values}, "
                  f"{_clock(now - self.start)} elapsed{left}", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class InterruptGuard:
    """Hold a Ctrl-C that lands inside `critical()` blocks until the block ends (see the module docstring).

    Active (as a context manager) only on the main thread while Python's default SIGINT handler is installed;
    otherwise it changes nothing."""

    def __init__(self):
        self._depth, self._held, self._previous = 0, False, None

    def __enter__(self):
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handler(self, signum, frame):
        if self._depth:
            self._held = True
        else:
            raise KeyboardInterrupt

    def critical(self) -> "_Critical":
        return _Critical(self)


class _Critical:
    def __init__(self, guard: InterruptGuard):
        self.guard = guard

    def __enter__(self):
        self.guard._depth += 1

    def __exit__(self, exc_type, *exc):
        g = self.guard
        g._depth -= 1
        if not g._depth and g._held and exc_type is None:
            g._held = False
            raise KeyboardInterrupt
