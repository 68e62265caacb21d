"""The training budget every method gets, and the hook that fits a fixed number of epochs into minutes.

Three forms (``Budget.parse``):

* ``EPOCHSxITERATIONS`` (``5x50``): that many epochs of that many iterations, whatever the time;
* ``Nmin`` / ``NminxITERATIONS`` (``10min``): wall clock per method; the trainer stops after the epoch in which the
  time ran out (its learning-rate schedule, planned over nnU-Net's 1000 epochs, is cut off there);
* ``EPOCHSxNmin`` (``8x1.5min``): ``EPOCHS`` epochs that together take ``N`` minutes: after every epoch the
  iterations per epoch are fitted to the time left (:class:`EpochsInMinutes`), so the poly learning-rate schedule
  runs to its end on any machine. The quick preset uses it: a short run only converges when the learning rate
  decays, and the run's length no longer depends on the machine's speed;
* ``EPOCHSxNcpumin`` (``8x1.5cpumin``): the same with the time counted in CPU seconds of the training process
  (``time.process_time``) instead of wall-clock seconds. The quick preset uses it: on a machine shared with other
  jobs a method gets the compute it was promised, not the wall time, so its iterations (and its Dice) do not
  depend on what else runs; on an idle machine with one thread and augmentation in this process the two agree.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass

#: validation iterations per epoch of a fitted budget (enough for the pseudo-Dice curve, cheap)
FITTED_VAL_ITERATIONS = 1
#: iterations of the first epoch of a fitted budget, before the step time is known
FIRST_EPOCH_ITERATIONS = 5


@dataclass(frozen=True)
class Budget:
    """``epochs`` x ``iterations``; or ``minutes`` of wall clock (``epochs`` None); or ``epochs`` in ``minutes``."""

    epochs: int | None = None
    iterations: int | None = None
    minutes: float | None = None
    clock: str = "wall"  # "wall" or "cpu" (fitted budgets: the time counted in CPU seconds of this process)

    @classmethod
    def parse(cls, text: str) -> "Budget":
        t = str(text).strip().lower().replace(" ", "")
        m = re.fullmatch(r"(\d+)x(\d+)", t)
        if m:
            e, i = int(m.group(1)), int(m.group(2))
            if e < 1 or i < 1:
                raise ValueError(f"--budget {text!r}: epochs and iterations must be at least 1")
            return cls(epochs=e, iterations=i)
        m = re.fullmatch(r"(\d+)x(\d+(?:\.\d+)?)(cpu)?(?:min|m)", t)
        if m:
            e, minutes = int(m.group(1)), float(m.group(2))
            if e < 1 or minutes <= 0:
                raise ValueError(f"--budget {text!r}: epochs and minutes must be positive")
            return cls(epochs=e, minutes=minutes, clock="cpu" if m.group(3) else "wall")
        m = re.fullmatch(r"(\d+(?:\.\d+)?)(?:min|m)(?:x(\d+))?", t)
        if m:
            minutes = float(m.group(1))
            if minutes <= 0:
                raise ValueError(f"--budget {text!r}: the number of minutes must be positive")
            return cls(minutes=minutes, iterations=int(m.group(2)) if m.group(2) else None)
        raise ValueError(f"--budget {text!r}: expected EPOCHSxITERATIONS (e.g. 5x50), MINUTESmin (e.g. 10min), "
                         f"MINUTESminxITERATIONS (e.g. 10minx50), EPOCHSxMINUTESmin (e.g. 8x1.5min) or "
                         f"EPOCHSxMINUTEScpumin (e.g. 8x1.5cpumin: CPU time)")

    @property
    def fitted(self) -> bool:
        """Epochs fitted into minutes (``EPOCHSxNmin``)."""
        return self.epochs is not None and self.minutes is not None

    @property
    def val_iterations(self) -> int | None:
        if self.fitted:
            return FITTED_VAL_ITERATIONS
        return None if self.iterations is None else max(1, self.iterations // 5)

    def __str__(self) -> str:
        if self.fitted:
            return f"{self.epochs} epochs in {self.minutes:g} {'CPU ' if self.clock == 'cpu' else ''}min per method"
        if self.minutes is not None:
            m = f"{self.minutes:g} min per method"
            return m + (f", {self.iterations} iterations/epoch" if self.iterations else "")
        return f"{self.epochs} epochs x {self.iterations} iterations"


class EpochsInMinutes:
    """Makes a trainer's ``num_epochs`` epochs last ``seconds`` by setting ``num_iterations_per_epoch`` after
    every epoch from the measured step time and per-epoch overhead (validation iterations, logging, plot).

    It wraps three of the trainer's epoch hooks on the instance: nnU-Net's loop (and nnharmony's) reads
    ``num_iterations_per_epoch`` anew every epoch, so nothing of the loop is copied. ``iterations`` records what
    every epoch ran."""

    def __init__(self, trainer, seconds: float, first_iterations: int = FIRST_EPOCH_ITERATIONS, clock: str = "wall"):
        self.trainer, self.seconds = trainer, float(seconds)
        self._clock = "process_time" if clock == "cpu" else "perf_counter"
        self.iterations: list[int] = []
        self._start: float | None = None
        self._epoch_start = self._train_end = 0.0
        trainer.num_iterations_per_epoch = int(first_iterations)
        start, end, epoch_end = trainer.on_train_epoch_start, trainer.on_train_epoch_end, trainer.on_epoch_end

        def on_train_epoch_start():
            self._epoch_start = self._now()
            if self._start is None:
                self._start = self._epoch_start
            start()

        def on_train_epoch_end(outputs):
            self._train_end = self._now()
            end(outputs)

        def on_epoch_end():
            epoch_end()
            self._fit()

        trainer.on_train_epoch_start, trainer.on_train_epoch_end = on_train_epoch_start, on_train_epoch_end
        trainer.on_epoch_end = on_epoch_end

    def _now(self) -> float:
        return getattr(time, self._clock)()

    def _fit(self) -> None:
        t = self.trainer
        done = t.num_iterations_per_epoch
        self.iterations.append(done)
        now = self._now()
        left_epochs = t.num_epochs - t.current_epoch  # on_epoch_end has counted the epoch
        if left_epochs <= 0:
            return
        step = (self._train_end - self._epoch_start) / max(1, done)
        overhead = now - self._train_end
        per_epoch = (self.seconds - (now - self._start)) / left_epochs
        t.num_iterations_per_epoch = max(1, int((per_epoch - overhead) / max(step, 1e-6)))
        if hasattr(t, "print_to_log_file"):
            t.print_to_log_file(f"time budget ({'CPU' if self._clock == 'process_time' else 'wall'} clock): {done} "
                                f"iterations took {step:.3f} s each (+{overhead:.2f} s per "
                                f"epoch); next epoch: {t.num_iterations_per_epoch} iterations")
