"""What this process has used so far: peak resident memory, CPU seconds, age. The benchmark and the scripts in
``benchmarks/`` measure with these."""
from __future__ import annotations

import os
import resource
import sys

_RU_MAXRSS_PER_MB = 2**20 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux


def own_peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux ``VmHWM``, since it started or since :func:`reset_peak_rss`).
    ``ru_maxrss`` of ``RUSAGE_SELF`` is only the fallback (no ``/proc``): after (v)fork + exec it starts from the
    parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / _RU_MAXRSS_PER_MB


def reset_peak_rss() -> bool:
    """Start this process's ``VmHWM`` anew (Linux ``clear_refs``), so each method's peak is its own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_seconds() -> float:
    """User + system time of this process and its finished children."""
    return sum(getattr(resource.getrusage(w), a) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for a in ("ru_utime", "ru_stime"))


def process_age_s() -> float | None:
    """Seconds since this process started (Linux), i.e. the interpreter's and the command's start-up so far."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
