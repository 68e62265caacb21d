"""Worker processes of planning and preprocessing that stop with the process that started them.

A killed ``nnharmony_plan_and_preprocess`` (SIGKILL, SIGTERM, an OOM kill) would otherwise leave its spawn
workers running: they drain the tasks already queued and keep writing preprocessed files under a folder that
the next run is repairing. Every worker therefore runs :func:`die_with_parent` first: on Linux the kernel
sends it SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``); elsewhere a watchdog thread polls the
parent pid. nnU-Net's fingerprint extractor builds its own ``multiprocessing`` pool; :func:`nnunet_pools_die_with_parent`
gives that pool the same initializer (:func:`nnunet_processes_bounded`).

One worker means no worker process at all: the work runs in this process (``-np 1`` is one process, and a
tiny dataset does not wait seconds for a spawn worker to import torch). nnU-Net also lists a raw dataset's
files with a pool of 12 forked processes (``nnunetv2.utilities.utils.create_lists_from_splitted_dataset_folder``,
called by the fingerprint extractor, the planner and the preprocessing); that name matching runs in this
process too.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from typing import Any, Callable, Iterator, Sequence

_PR_SET_PDEATHSIG = 1
_WATCHDOG_INTERVAL_S = 0.5


def die_with_parent(parent_pid: int) -> None:
    """Pool initializer: end this worker as soon as ``parent_pid`` is gone (also if it already is). Linux sends
    the signal when the *thread* that started the worker ends: the pools here live inside one call."""
    if not _set_parent_death_signal():
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="die-with-parent").start()
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os._exit(1)


def _set_parent_death_signal() -> bool:
    """Ask Linux to SIGKILL this process when its parent exits; False where prctl is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(_WATCHDOG_INTERVAL_S)
    os._exit(1)


def _chained_initializer(parent_pid: int, initializer: Callable | None, initargs: Sequence[Any]) -> None:
    die_with_parent(parent_pid)
    if initializer is not None:
        initializer(*initargs)


def process_pool(num_processes: int) -> Executor:
    """A spawn process pool (as nnU-Net's) whose workers stop with this process. A dead worker (OOM kill)
    surfaces as ``BrokenProcessPool`` instead of a hang."""
    return ProcessPoolExecutor(num_processes, mp_context=multiprocessing.get_context("spawn"),
                               initializer=die_with_parent, initargs=(os.getpid(),))


class _Done:
    """The ``AsyncResult`` of work already done."""

    def __init__(self, value: Any):
        self._value = value

    def ready(self) -> bool:
        return True

    def get(self, timeout: float | None = None) -> Any:
        return self._value


class InProcessPool:
    """A ``multiprocessing.Pool`` as nnU-Net's fingerprint extractor (``starmap_async``, ``_pool``) and file
    listing (``starmap``) use it, run in this process."""

    _pool: list = []

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __enter__(self) -> "InProcessPool":
        return self

    def __exit__(self, *exc: Any) -> bool:
        return False

    def starmap_async(self, fn: Callable, iterable: Any) -> _Done:
        return _Done([fn(*args) for args in iterable])

    def starmap(self, fn: Callable, iterable: Any) -> list:
        return [fn(*args) for args in iterable]


class _Context:
    """A multiprocessing context whose ``Pool`` workers run :func:`die_with_parent` first (one worker: none)."""

    def __init__(self, ctx: Any):
        self._ctx = ctx

    def Pool(self, processes: int | None = None, initializer: Callable | None = None, initargs: Sequence = (),
             *args: Any, **kwargs: Any):  # noqa: N802 (multiprocessing's name)
        if processes == 1 and initializer is None:
            return InProcessPool()
        return self._ctx.Pool(processes, _chained_initializer, (os.getpid(), initializer, tuple(initargs)),
                              *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)


class _Multiprocessing:
    """Stands in for the ``multiprocessing`` module inside an nnU-Net module (see the module docstring)."""

    def get_context(self, method: str | None = None) -> _Context:
        return _Context(multiprocessing.get_context(method))

    def __getattr__(self, name: str) -> Any:
        return getattr(multiprocessing, name)


_SWAP_LOCK = threading.RLock()


@contextlib.contextmanager
def nnunet_processes_bounded() -> Iterator[None]:
    """Within the block, nnU-Net's fingerprint pool stops with this process (and runs here for one worker), and
    its file listing starts no processes. (Should nnU-Net stop creating pools through these module names, the
    swap has no effect.)"""
    from nnunetv2.experiment_planning.dataset_fingerprint import fingerprint_extractor
    from nnunetv2.utilities import utils

    with _SWAP_LOCK:
        swaps = [(fingerprint_extractor, "multiprocessing", _Multiprocessing()), (utils, "Pool", InProcessPool)]
        originals = [(m, name, getattr(m, name)) for m, name, _ in swaps if hasattr(m, name)]
        for m, name, new in swaps:
            if hasattr(m, name):
                setattr(m, name, new)
        try:
            yield
        finally:
            for m, name, original in reversed(originals):
                setattr(m, name, original)
