"""The one way nnharmony reads a weights or checkpoint file: no code from the file ever runs.

``torch.load(..., weights_only=True)`` unpickles only tensors, containers and plain values; on top of torch's
own allow-list, only numpy's scalar and dtype reconstruction is allowed (plain nnU-Net checkpoints log numpy
floats). A file that needs anything else -- a malicious ``__reduce__``, a pickled class, a foreign format -- is
refused with one line that names the file and keeps torch's reason. Loading weights into a network is strict:
missing, unexpected and mis-shaped keys are named instead of ending in a raw ``AssertionError``.
"""
from __future__ import annotations

import os
import re
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch

_torch_load = torch.load  # torch's own, also while torch_load_made_safe has replaced torch.load

#: prefixes that wrappers add to parameter names: DDP (``module.``) and ``torch.compile`` (``_orig_mod.``)
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _numpy_globals() -> list:
    """numpy's scalar/dtype reconstruction: what a checkpoint with numpy floats in its log needs, nothing else."""
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    dtype_classes = [type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32,
                                                 np.int64, np.uint8, np.uint16, np.uint32, np.uint64, np.bool_)]
    return [scalar, np.dtype, *dtype_classes]


_REFUSED_GLOBAL = re.compile(r"unsupported (?:global: )?GLOBAL (\S+?)\.?(?:\s|$)", re.I)


def _reason(exc: BaseException) -> str:
    """torch's refusal on one line: the global the file asked for (``posix.mkdir``) when that
    was the reason, without torch's advice to load with ``weights_only=False``; else its message."""
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).split())
    found = _REFUSED_GLOBAL.search(text)
    if found:
        return f"it needs the global {found.group(1)}, which weights_only loading does not allow"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def read_weights_file(path: str | os.PathLike, what: str = "checkpoint",
                      map_location: str | torch.device = "cpu") -> Any:
    """Unpickle ``path`` with ``weights_only=True`` (+ numpy scalars); ValueError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return _torch_load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a pickle that needs code, a truncated file, a file that is no torch file at all
        fmt = "" if zipfile.is_zipfile(path) else "not a torch.save archive; "  # torch's own reason is cryptic
        raise ValueError(f"{path}: not a loadable {what}, refused without running code from it "
                         f"({fmt}{_reason(e)})") from None


def state_dict_of(content: Any, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The network weights in a loaded file: a checkpoint's ``network_weights`` (nnU-Net, nnharmony), a
    ``state_dict``/``model`` entry, or a bare state dict; wrapper prefixes removed."""
    if isinstance(content, Mapping):
        for key in ("network_weights", "state_dict", "model"):
            if isinstance(content.get(key), Mapping):
                content = content[key]
                break
    if not isinstance(content, Mapping) or not content or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in content.items()):
        raise ValueError(f"{path}: holds no network weights (expected a state dict of tensors or a checkpoint "
                         f"with 'network_weights')")
    out = {}
    for k, v in content.items():
        for prefix in WRAPPER_PREFIXES:
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _named(keys: Iterable[str], limit: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def weight_mismatches(expected: Mapping[str, torch.Tensor], loaded: Mapping[str, torch.Tensor],
                      skip: tuple[str, ...] = ()) -> list[str]:
    """What keeps ``loaded`` from fitting ``expected`` (keys containing a ``skip`` part ignored): one phrase per
    kind of mismatch, the keys named."""
    want = {k: v for k, v in expected.items() if not any(s in k for s in skip)}
    have = {k: v for k, v in loaded.items() if not any(s in k for s in skip)}
    problems = []
    missing = want.keys() - have.keys()
    unexpected = have.keys() - want.keys()
    shapes = [k for k in want.keys() & have.keys() if tuple(want[k].shape) != tuple(have[k].shape)]
    if missing:
        problems.append(f"missing {len(missing)} key(s): {_named(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {_named(unexpected)}")
    if shapes:
        k = sorted(shapes)[0]
        problems.append(f"{len(shapes)} key(s) of another shape: {_named(shapes)} (e.g. {k}: file "
                        f"{tuple(have[k].shape)}, network {tuple(want[k].shape)})")
    return problems


def load_weights_into(network: torch.nn.Module, path: str | os.PathLike, what: str = "weights file",
                      skip: tuple[str, ...] = ()) -> list[str]:
    """Load the weights of ``path`` into ``network`` strictly, except keys containing a ``skip`` part (those keep
    the network's values); returns the keys loaded. ValueError naming the file and mismatching keys."""
    loaded = state_dict_of(read_weights_file(path, what), path)
    target = network
    while hasattr(target, "module") and isinstance(target.module, torch.nn.Module):  # DDP
        target = target.module
    target = getattr(target, "_orig_mod", target)  # torch.compile
    current = target.state_dict()
    problems = weight_mismatches(current, loaded, skip)
    if problems:
        raise ValueError(f"{path}: does not fit the network ({'; '.join(problems)})")
    keys = [k for k in current if not any(s in k for s in skip)]
    current.update({k: loaded[k] for k in keys})
    target.load_state_dict(current)
    return keys


@contextmanager
def torch_load_made_safe(what: str = "checkpoint") -> Iterator[None]:
    """Within the block, ``torch.load`` is :func:`read_weights_file`: for third-party code that loads a file
    itself with ``weights_only=False`` and has no safe entry point (nnU-Net 2.8's
    ``nnUNetTrainer.load_checkpoint`` ignores a dict it is given and unpickles its path)."""
    def safe_load(f, map_location=None, *args, **kwargs):
        return read_weights_file(f, what, map_location=map_location or "cpu")

    original, torch.load = torch.load, safe_load
    try:
        yield
    finally:
        torch.load = original
