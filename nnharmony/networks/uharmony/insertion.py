"""Insertion depth: which InstanceNorm layers of a U-Net become :class:`~.norm.UHarmonyNorm` (``replace_norms``
and its stage grammar)."""
from __future__ import annotations

import re
from typing import Optional, Union

import torch
from torch import nn
from torch.nn.modules.instancenorm import _InstanceNorm

from nnharmony.networks.uharmony.norm import UHarmonyNorm


_TERM = re.compile(r"^(all|none|encoder|decoder|first:\d+|last:\d+)$")
_DEC = re.compile(r"(?:^|\.)decoder\.stages\.(\d+)(?:\.|$)")
_ENC = re.compile(r"(?:^|\.)encoder\.stages\.(\d+)(?:\.|$)")
_STEM = re.compile(r"(?:^|\.)encoder\.stem(?:\.|$)")


def parse_stages(stages: Union[str, None]) -> list[tuple[str, str]]:
    """Parse a stage spec into [(sign, term)]; see ``replace_norms``."""
    spec = "all" if stages is None else str(stages).replace(" ", "").lower()
    if not spec:
        raise ValueError("empty stage spec")
    parts = re.findall(r"([+-]?)([^+-]+)", spec)
    if "".join(s + t for s, t in parts) != spec:
        raise ValueError(f"cannot parse stage spec {stages!r}")
    out = []
    for i, (sign, term) in enumerate(parts):
        if not _TERM.match(term):
            raise ValueError(f"unknown stage term {term!r} in {stages!r}; use all, none, encoder, decoder, "
                             f"first:k, last:k joined by + or -")
        if i == 0 and sign == "-":
            raise ValueError(f"stage spec {stages!r} must start with a positive term")
        out.append((sign or "+", term))
    return out


def _norm_location(name: str) -> tuple[Optional[str], Optional[int]]:
    m = _DEC.search(name)
    if m:
        return "decoder", int(m.group(1))
    if _STEM.search(name):
        return "encoder", 0
    m = _ENC.search(name)
    if m:
        return "encoder", int(m.group(1))
    return None, None


def _term_selects(term: str, where: Optional[str], idx: Optional[int], n_enc: int) -> bool:
    if term == "all":
        return True
    if term == "none":
        return False
    if term in ("encoder", "decoder"):
        return where == term
    kind, k = term.split(":")
    k = int(k)
    if where != "encoder":
        return False
    return idx < k if kind == "first" else idx >= n_enc - k


def replace_norms(network: nn.Module, stages: Union[str, None] = "all", **norm_kwargs) -> list[str]:
    """Swap the InstanceNorm layers of a U-Net for ``UHarmonyNorm`` in place; return the replaced names.

    Works on dynamic_network_architectures' PlainConvUNet and ResidualEncoderUNet (2D or 3D) or anything
    with ``encoder.stages`` / ``decoder.stages`` (e.g. ``UHarmonyNet``). Weight/bias are copied into a_1/b
    and every reference to a replaced module (``conv.norm`` and ``conv.all_modules[i]``) is updated.

    Stage grammar ("insertion depth"), terms joined by ``+`` (union) or ``-`` (remove), left to right:
        all        every InstanceNorm in the network (default: all encoder and decoder norms)
        none       nothing
        encoder    all encoder stages (ResidualEncoder's stem counts as encoder stage 0)
        decoder    all decoder stages
        first:k    encoder stages 0..k-1 (the k highest-resolution stages, stem included)
        last:k     encoder stages n-k..n-1 (the k deepest, bottleneck included)
    'first:k' and 'last:k' count ENCODER stages only; add '+decoder' for the decoder. Examples:
    'first:2', 'encoder-first:1' (all encoder norms but the stem/first stage), 'last:2+decoder'.

    ``norm_kwargs`` go to ``UHarmonyNorm`` (poly_order, restoration, num_domains, clamp, init_restore_mix).
    """
    terms = parse_stages(stages)
    n_enc = None
    enc = getattr(network, "encoder", None)
    if enc is not None and hasattr(enc, "stages"):
        n_enc = len(enc.stages)
    if n_enc is None and any(t.startswith("last:") for _, t in terms):
        raise ValueError("'last:k' needs network.encoder.stages")

    selected: dict[int, tuple[str, nn.Module]] = {}
    for name, mod in network.named_modules():
        if not isinstance(mod, _InstanceNorm):
            continue
        where, idx = _norm_location(name)
        keep = False
        for sign, term in terms:
            if _term_selects(term, where, idx, n_enc or 0):
                keep = sign == "+"
        if keep:
            selected[id(mod)] = (name, mod)
    if not selected:
        return []
    new_mods = {i: UHarmonyNorm.from_norm(m, **norm_kwargs) for i, (_, m) in selected.items()}
    swaps = []
    for parent in network.modules():
        for child_name, child in parent._modules.items():
            if child is not None and id(child) in new_mods:
                swaps.append((parent, child_name, new_mods[id(child)]))
    for parent, child_name, new in swaps:
        parent._modules[child_name] = new
    return [name for name, _ in selected.values()]
