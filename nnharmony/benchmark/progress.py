"""One progress line for the whole benchmark: which method, which step, elapsed time and estimated time left.

The line goes to a copy of the terminal's stderr, so it stays visible while file descriptors 1 and 2 go to the
method's log. A thread refreshes it every second (a trainer runs for minutes without returning). On a terminal
the line is redrawn in place; otherwise (a log file, CI) a new line is written when the step changes and every
``every_s`` seconds.

Time left = what is left of the current step's estimate + the estimates of the steps to come. A step's estimate is
its budget when it has one (training under a minutes budget), else the mean of the steps of the same kind done so
far, else ``default_s``.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, TextIO


def fmt_clock(seconds: float) -> str:
    s = int(round(max(0.0, seconds)))
    return f"{s // 60}:{s % 60:02d}"


@dataclass
class Step:
    method: str
    kind: str  # "data + planning", "training", "validation", "prediction", "evaluation", "report"
    budget_s: float | None = None  # known duration (a minutes budget)
    done_s: float | None = None


class Progress:
    def __init__(self, steps: list[Step], disable: bool = False, every_s: float = 30.0, default_s: float = 20.0):
        self.steps, self.disable, self.every_s, self.default_s = steps, disable, every_s, default_s
        self.index = -1
        self.t0 = self.step_t0 = time.perf_counter()
        self.trainer: Any = None  # the running trainer: its epoch is shown
        self.detail = ""  # shown after the step (e.g. "model 2/3", "validating")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._last_line, self._last_write = "", 0.0
        self.file: TextIO | None = None
        if not disable:
            try:
                self.file = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1)
            except (AttributeError, OSError, ValueError):  # no real stderr (captured): write where it points
                self.file = sys.stderr
            self.tty = bool(getattr(self.file, "isatty", lambda: False)())
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ state
    def start(self, method: str, kind: str) -> None:
        """Finish the current step and start the next one of this method and kind."""
        with self._lock:
            now = time.perf_counter()
            if 0 <= self.index < len(self.steps):
                self.steps[self.index].done_s = now - self.step_t0
            nxt = next((i for i in range(self.index + 1, len(self.steps))
                        if self.steps[i].method == method and self.steps[i].kind == kind), None)
            if nxt is None:
                self.steps.insert(self.index + 1, Step(method, kind))
                nxt = self.index + 1
            for i in range(self.index + 1, nxt):  # skipped steps (a method that failed or was skipped)
                self.steps[i].done_s = 0.0
            self.index, self.step_t0, self.trainer, self.detail = nxt, now, None, ""
        self._refresh(force=True)

    def skip_method(self, method: str) -> None:
        with self._lock:
            for s in self.steps[self.index + 1:]:
                if s.method == method:
                    s.done_s = 0.0

    def _estimate(self, step: Step) -> float:
        if step.budget_s is not None:
            return step.budget_s
        same = [s.done_s for s in self.steps if s.kind == step.kind and s.done_s]
        return sum(same) / len(same) if same else self.default_s

    def line(self) -> str:
        with self._lock:
            now = time.perf_counter()
            if self.index < 0:
                return "starting"
            cur = self.steps[self.index]
            left = max(0.0, self._estimate(cur) - (now - self.step_t0))
            left += sum(self._estimate(s) for s in self.steps[self.index + 1:] if s.done_s is None)
            methods = list(dict.fromkeys(s.method for s in self.steps if s.method))
            what = cur.kind
            if cur.method:
                what = f"{cur.method} ({methods.index(cur.method) + 1}/{len(methods)}): {cur.kind}"
            if self.detail:
                what += f", {self.detail}"
            t = self.trainer
            if t is not None and cur.kind == "training" and "validating" not in self.detail:
                try:
                    what += f", epoch {min(t.current_epoch + 1, t.num_epochs)}/{t.num_epochs}"
                except AttributeError:
                    pass
            return f"[benchmark] {what} | elapsed {fmt_clock(now - self.t0)} | about {fmt_clock(left)} left"

    # ------------------------------------------------------------------ output
    def _refresh(self, force: bool = False) -> None:
        if self.disable or self.file is None:
            return
        text = self.line()
        now = time.perf_counter()
        try:
            if self.tty:
                self.file.write("\r" + text.ljust(len(self._last_line)))
                self.file.flush()
            elif force or now - self._last_write >= self.every_s:
                self.file.write(text + "\n")
                self._last_write = now
        except (OSError, ValueError):
            return
        self._last_line = text

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            self._refresh()

    def write(self, text: str) -> None:
        """A message on its own line (the progress line is redrawn under it)."""
        if self.disable or self.file is None:
            print(text, flush=True)
            return
        self.file.write(("\r" + " " * len(self._last_line) + "\r" if self.tty else "") + text + "\n")
        self._refresh(force=True)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            if 0 <= self.index < len(self.steps):
                self.steps[self.index].done_s = time.perf_counter() - self.step_t0
        if not self.disable and self.file is not None:
            if self.tty:
                self._refresh(force=True)
                self.file.write("\n")
            if self.file is not sys.stderr:
                self.file.close()
