"""U-Harmony as plain ``torch.nn.Module``s (reconstructed; see METHODS.md section A.3).

U-Harmony ("U-Harmony: Enhancing Joint Training for Segmentation Models with Universal Harmonization",
Ma et al., arXiv 2601.14605) replaces the normalization layers of a segmentation backbone by a two-stage
harmonization and adds a domain-gated head so that inference needs no dataset label. Only stage 1 (instance
standardization) is confirmed by the reachable text; everything else below is a reconstruction and every
choice is a switch. The public pieces:

``UHarmonyNorm`` / ``UHarmonyNorm2d`` / ``UHarmonyNorm3d``
    Drop-in ``norm_op`` with ``nn.InstanceNormNd``'s call signature. For x: (B, C, *spatial)::

        stage 1   xhat = (x - mu) / sqrt(var + eps)              per sample and channel, in float32
        affine    h    = a_1 * xhat + sum_{k=2..K} a_k * clamp(xhat, +-c)^k + b
        stage 2   'none'     : y = h
                  'instance' : y = lam * (h * sqrt(var + eps) + mu) + (1 - lam) * h     (R1, RevIN-like)
                               lam = sigmoid(rho) * s,  s zero-initialised
                  'domain'   : y = sum_d g_d * (gamma_d * h + beta_d)                   (R2)
                               g: (B, D) gate weights from the context (below)

    At initialisation (a_1 = IN weight, b = IN bias, a_{k>1} = 0, s = 2 * init_restore_mix = 0, gamma = 1,
    beta = 0) the layer equals ``nn.InstanceNormNd(affine=True)`` exactly, for every restoration variant.

Gate context
    R2 layers need per-sample gate weights. ``UHarmonyNet`` writes them into ``layer.current_gate``
    ((B, D) tensor) of every ``UHarmonyNorm`` before the backbone runs and clears them afterwards
    (``set_gate`` / ``gate_context``). A layer without a gate uses uniform weights 1/D.

``replace_norms``
    Swaps the InstanceNorm layers of a dynamic_network_architectures U-Net for ``UHarmonyNorm`` (the
    "insertion depth" switch, see its docstring for the stage grammar).

``DomainGate``, ``GateEncoder``, ``GatedHeads``, ``UHarmonyNet``
    The domain-gated head: g = softmax(cos(W z, P_d) / tau + bias_d) with z a global average pool; one
    1x1 head per domain and deep-supervision scale, logits = sum_d g_d Head_d(f); oracle mode uses
    g = one_hot(domain_id).

``widen_input_channels``, ``add_domains``, ``add_output_tasks``, ``adaptation_parameters``
    Universal modality / class adaptation as function-preserving network surgery.

Tensor shapes are written as (B, C, *spatial) with *spatial = (X, Y) or (X, Y, Z).
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.instancenorm import _InstanceNorm

__all__ = [
    "RESTORATIONS",
    "GATE_MODES",
    "UHarmonyNorm",
    "UHarmonyNorm2d",
    "UHarmonyNorm3d",
    "uharmony_norms",
    "set_gate",
    "gate_context",
    "parse_stages",
    "replace_norms",
    "GateEncoder",
    "DomainGate",
    "GatedHeads",
    "UHarmonyNet",
    "widen_input_channels",
    "add_domains",
    "add_output_tasks",
    "adaptation_parameters",
    "freeze_for_adaptation",
]

RESTORATIONS = ("instance", "domain", "none")
GATE_MODES = ("soft", "oracle", "uniform")
GATE_SOURCES = ("input", "bottleneck")


def _no_autocast(device_type: str):
    """A context that disables autocast on ``device_type`` (a no-op where autocast is unsupported)."""
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # device type without autocast support
        return contextlib.nullcontext()


def _conv_op(dim: int):
    if dim == 2:
        return nn.Conv2d
    if dim == 3:
        return nn.Conv3d
    raise ValueError(f"dim must be 2 or 3, got {dim}")


# ----------------------------------------------------------------------------------------------------------
# harmonization layer
# ----------------------------------------------------------------------------------------------------------
def _spatial_dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sum over the spatial dims of u * v, per (sample, channel), as (B, C, 1...).

    On a CPU a batched matrix product reads both tensors once and allocates nothing full-size, where
    ``(u * v).sum()`` first writes a fresh full-size product (a fresh allocation costs several passes there).
    Elsewhere (CUDA's cached allocator) the plain form avoids cuBLAS's slow batched matrix-vector path."""
    keep = u.shape[:2] + (1,) * (u.ndim - 2)
    if u.device.type != "cpu":
        return (u * v).sum(tuple(range(2, u.ndim)), keepdim=True)
    bc = u.shape[0] * u.shape[1]
    return torch.bmm(u.reshape(bc, 1, -1), v.reshape(bc, -1, 1)).view(keep)


def _sum_to(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum a (B, C, 1...) gradient over the batch where ``like`` is (1, C, 1...)."""
    return t.sum(0, keepdim=True) if like.shape[0] == 1 and t.shape[0] != 1 else t


def _restoration_scale(S0: torch.Tensor | None, lam: torch.Tensor | None, std: torch.Tensor):
    """S = S0 + lam * std of :class:`_Harmonize` (S0 None: 1; lam None: 0), shared by forward and backward."""
    S = 1.0 if S0 is None else S0
    return S if lam is None else S + lam * std


class _Harmonize(torch.autograd.Function):
    """The whole :class:`UHarmonyNorm` computation on full-size tensors, with a hand-written backward::

        mu, var = instance statistics of x;  std = sqrt(var + eps);  xhat = (x - mu) / std
        h = b + w * xhat + sum_k a_k * clamp(xhat)^k
        y = S * h + T,   S = S0 + lam * std,   T = T0 + lam * mu

    Why one function: autograd would keep about ten full-size intermediates per layer and spend a fresh
    allocation on almost every element-wise step; here forward allocates three full-size tensors and saves only
    ``x``, backward allocates three and folds the statistics' own gradient (mu and std depend on x) into
    ``grad_x`` analytically. Every sum over h or the powers is rewritten as a per-(sample, channel) combination
    of a few spatial dot products, so h itself is never built in backward.
    Shapes: x (B, C, *sp); w, b (1, C, 1...); a (K-1, 1, C, 1...) with a[j] the coefficient of
    clamp(xhat)^(j+2), or None; S0, T0 (B or 1, C, 1...) or None (1 and 0); lam (1, C, 1...) or None (0)."""

    @staticmethod
    def forward(ctx, x, w, b, a, S0, T0, lam, eps, clamp):
        red = tuple(range(2, x.ndim))
        n = math.prod(x.shape[2:])
        mu = x.sum(red, keepdim=True).div_(n)
        y = x - mu  # becomes the output
        std = _spatial_dot(y, y).div_(n).add_(eps).sqrt_()  # two-pass variance: no cancellation
        r = std.reciprocal()
        S = _restoration_scale(S0, lam, std)
        T = 0.0 if T0 is None else T0
        if lam is not None:
            T = T + lam * mu
        if a is not None:
            xc = y * r
            if clamp is not None:
                xc.clamp_(-clamp, clamp)
            aS = a * S  # fold S into the coefficients: S * P(xc) = xc^2 (S a_2 + xc (S a_3 + ...))
            acc = torch.addcmul(aS[-2], xc, aS[-1]) if a.shape[0] > 1 else aS[-1].expand_as(xc).clone()
            for k in range(a.shape[0] - 3, -1, -1):  # Horner
                acc.mul_(xc).add_(aS[k])
            acc.mul_(xc)
        y.mul_(S * w * r).add_(S * b + T)
        if a is not None:
            y.addcmul_(acc, xc)
        ctx.save_for_backward(x, mu, std, w, b, a, S0, T0, lam)
        ctx.clamp = clamp
        return y

    @staticmethod
    def backward(ctx, g):
        x, mu, std, w, b, a, S0, T0, lam = ctx.saved_tensors
        clamp = ctx.clamp
        g = g.contiguous()
        red = tuple(range(2, x.ndim))
        n = math.prod(x.shape[2:])
        r = std.reciprocal()
        S = _restoration_scale(S0, lam, std)
        xhat = torch.addcmul(-mu * r, x, r)
        sum_g = g.sum(red, keepdim=True)
        dot_g_xhat = _spatial_dot(g, xhat)
        sum_gh = b * sum_g + w * dot_g_xhat  # sum over space of g * h, per (sample, channel)
        grad_a = None
        if a is None:
            q = g * w  # dL/dxhat / S
        else:
            xc = xhat if clamp is None else xhat.clamp(-clamp, clamp)
            power = xc * xc
            dots = []
            for j in range(a.shape[0]):  # sum g * xc^k, k = 2..K
                if j:
                    power.mul_(xc)
                dots.append(_spatial_dot(g, power))
            dots = torch.stack(dots)
            sum_gh = sum_gh + (a * dots).sum(0)
            grad_a = (S * dots).sum(1, keepdim=True)
            q = power  # reuse: P'(xc) = xc (2 a_2 + xc (3 a_3 + ...)), then q = g * (w + P' * unclamped)
            k_last = a.shape[0] + 1
            if a.shape[0] > 1:
                torch.addcmul(a[-2] * (k_last - 1), xc, a[-1] * k_last, out=q)
            else:
                q.copy_((a[-1] * k_last).expand_as(xc))
            for j in range(a.shape[0] - 3, -1, -1):
                q.mul_(xc).add_(a[j] * (j + 2))
            q.mul_(xc)
            if clamp is not None:
                q.mul_(torch.eq(xc, xhat, out=xc))  # 1 where xhat was not clamped (xc no longer needed)
            q.add_(w).mul_(g)
        grad_w = (S * dot_g_xhat).sum(0, keepdim=True)
        grad_b = (S * sum_g).sum(0, keepdim=True)
        # x -> (xhat, mu, std): d mu/dx = 1/n, d std/dx = xhat/n; dL/dmu, dL/dstd direct = lam * (sum g, sum g h)
        Sr = S * r
        c1 = -Sr * q.sum(red, keepdim=True)
        c2 = -Sr * _spatial_dot(q, xhat)
        if lam is not None:
            c1 = c1 + lam * sum_g
            c2 = c2 + lam * sum_gh
        grad_x = q.mul_(Sr).add_(c1.div_(n)).addcmul_(xhat, c2.div_(n))
        grad_S0 = None if S0 is None else _sum_to(sum_gh, S0)
        grad_T0 = None if T0 is None else _sum_to(sum_g, T0)
        grad_lam = None if lam is None else (sum_gh * std + sum_g * mu).sum(0, keepdim=True)
        return grad_x, grad_w, grad_b, grad_a, grad_S0, grad_T0, grad_lam, None, None


class UHarmonyNorm(nn.Module):
    """Two-stage harmonization replacing ``nn.InstanceNormNd``.

    Args (positional order = ``nn.InstanceNormNd``'s, so it is a drop-in ``norm_op``):
        num_features: C.
        eps: added to the instance variance.
        momentum, track_running_stats, device, dtype: accepted for signature compatibility and ignored
            (statistics are always the instance's own, as nnU-Net uses InstanceNorm).
        affine: accepted for compatibility. The polynomial affine is the method's core and is always
            learnable; it is initialised to the identity, so the layer equals InstanceNorm with either value.
    Keyword-only:
        dim: 2 or 3 (spatial dimensions; the input must be (B, C, *spatial)).
        poly_order: K >= 1, order of the polynomial affine.
        restoration: 'instance' (R1), 'domain' (R2) or 'none'.
        num_domains: D, number of (gamma_d, beta_d) pairs for 'domain'.
        clamp: xhat is clamped to [-clamp, clamp] before the powers k >= 2 (None: no clamp). The linear term
            is not clamped, which keeps the layer exactly equal to InstanceNorm at initialisation.
        init_restore_mix: initial effective R1 mix lambda (default 0 = InstanceNorm at init).

    Parameters: ``weight`` (C) = a_1, ``bias`` (C) = b (names match InstanceNorm's, so IN state dicts load),
    ``poly_weight`` (K-1, C) = a_2..a_K; R1: ``restore_logit`` (C) = rho and ``restore_scale`` (C) = s with
    lam = sigmoid(rho) * s; R2: ``domain_gamma`` (D, C), ``domain_beta`` (D, C).

    R1 parameterisation (reconstruction choice): the paper-style mix is lam = sigmoid(rho), but lam = 0
    exactly (InstanceNorm at init) is not reachable with a finite rho. We multiply by a zero-initialised
    per-channel scale s (as in zero-init residual branches): lam = sigmoid(rho) * s. At init, s receives a
    non-zero gradient and rho a zero one; rho starts learning as soon as s moves. s is unconstrained, so
    lam may leave [0, 1] (over-/extrapolated restoration) if the data ask for it.

    Gate context: ``current_gate`` is None or a (B, D) (or (1, D)) tensor of per-sample gate weights used by
    R2, set by ``UHarmonyNet`` (see ``set_gate``); None means uniform weights 1/D.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = False,
        device=None,
        dtype=None,
        *,
        dim: int = 3,
        poly_order: int = 3,
        restoration: str = "instance",
        num_domains: int = 1,
        clamp: Optional[float] = 6.0,
        init_restore_mix: float = 0.0,
    ):
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        if dim not in (2, 3):
            raise ValueError(f"dim must be 2 or 3, got {dim}")
        if poly_order < 1:
            raise ValueError(f"poly_order must be >= 1, got {poly_order}")
        if restoration not in RESTORATIONS:
            raise ValueError(f"restoration must be one of {RESTORATIONS}, got {restoration!r}")
        if num_domains < 1:
            raise ValueError(f"num_domains must be >= 1, got {num_domains}")
        if clamp is not None and clamp <= 0:
            raise ValueError(f"clamp must be > 0 or None, got {clamp}")
        self.num_features = num_features
        self.eps = eps
        self.affine = affine
        self.momentum = momentum
        self.track_running_stats = track_running_stats
        self.dim = dim
        self.poly_order = poly_order
        self.restoration = restoration
        self.num_domains = num_domains
        self.clamp = clamp
        factory = {"device": device, "dtype": dtype}

        self.weight = nn.Parameter(torch.ones(num_features, **factory))
        self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        if poly_order > 1:
            self.poly_weight = nn.Parameter(torch.zeros(poly_order - 1, num_features, **factory))
        else:
            self.register_parameter("poly_weight", None)
        if restoration == "instance":
            self.restore_logit = nn.Parameter(torch.zeros(num_features, **factory))  # sigmoid(0) = 0.5
            self.restore_scale = nn.Parameter(torch.full((num_features,), 2.0 * init_restore_mix, **factory))
        if restoration == "domain":
            self.domain_gamma = nn.Parameter(torch.ones(num_domains, num_features, **factory))
            self.domain_beta = nn.Parameter(torch.zeros(num_domains, num_features, **factory))
        self.current_gate: Optional[torch.Tensor] = None

    # -- helpers ---------------------------------------------------------------------------------------
    @classmethod
    def from_norm(cls, norm: nn.Module, **kwargs) -> "UHarmonyNorm":
        """Build from an ``nn.InstanceNormNd``, copying its affine weight/bias into a_1/b."""
        if not isinstance(norm, _InstanceNorm):
            raise TypeError(f"expected an InstanceNorm module, got {type(norm).__name__}")
        dim = {nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3}.get(type(norm))
        if dim is None:
            raise TypeError(f"only InstanceNorm2d/3d can be replaced, got {type(norm).__name__}")
        kwargs["dim"] = dim
        ref = norm.weight if norm.weight is not None else None
        layer = cls(norm.num_features, eps=norm.eps, affine=True,
                    device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype,
                    **kwargs)
        if norm.affine and norm.weight is not None:
            with torch.no_grad():
                layer.weight.copy_(norm.weight)
                layer.bias.copy_(norm.bias)
        return layer

    @property
    def restore_mix(self) -> Optional[torch.Tensor]:
        """Effective per-channel R1 mix lambda (C) or None for other variants."""
        if self.restoration != "instance":
            return None
        return torch.sigmoid(self.restore_logit) * self.restore_scale

    @torch.no_grad()
    def set_restore_mix(self, value: float) -> None:
        """Set the effective R1 mix lambda to ``value`` exactly (rho = 0, s = 2 * value)."""
        if self.restoration != "instance":
            raise RuntimeError("set_restore_mix needs restoration='instance'")
        self.restore_logit.zero_()
        self.restore_scale.fill_(2.0 * value)

    def _gate(self, batch: int, device, dtype) -> torch.Tensor:
        """(B, D) gate weights from the context, or uniform."""
        g = self.current_gate
        if g is None:
            return torch.full((batch, self.num_domains), 1.0 / self.num_domains, device=device, dtype=dtype)
        if g.ndim != 2 or g.shape[1] != self.num_domains:
            raise ValueError(f"gate must be (B, {self.num_domains}), got {tuple(g.shape)}")
        if g.shape[0] != batch:
            if g.shape[0] != 1:
                raise ValueError(f"gate batch {g.shape[0]} does not match input batch {batch}")
            g = g.expand(batch, -1)
        return g.to(device=device, dtype=dtype)

    # -- forward ---------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, *spatial) -> (B, C, *spatial), same dtype as x."""
        if x.ndim != self.dim + 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected (B, {self.num_features}, {self.dim} spatial dims), got {tuple(x.shape)}")
        in_dtype = x.dtype
        shape = (1, -1) + (1,) * self.dim
        with _no_autocast(x.device.type):
            ct = torch.float64 if in_dtype == torch.float64 else torch.float32  # half: float32
            xf = x.to(ct)
            # restoration as a per-(sample, channel) affine y = S * h + T with S = S0 + lam * std, T = T0 + lam * mu
            S0 = T0 = lam = None
            if self.restoration == "instance":
                lam = (torch.sigmoid(self.restore_logit.to(ct)) * self.restore_scale.to(ct)).view(shape)
                S0 = 1.0 - lam  # lam * (h * std + mu) + (1 - lam) * h
            elif self.restoration == "domain":
                g = self._gate(x.shape[0], x.device, ct)
                bshape = (x.shape[0], -1) + (1,) * self.dim
                S0, T0 = (g @ self.domain_gamma.to(ct)).view(bshape), (g @ self.domain_beta.to(ct)).view(bshape)
            a = None if self.poly_weight is None else self.poly_weight.to(ct).view(-1, 1, self.num_features,
                                                                                   *(1,) * self.dim)
            y = _Harmonize.apply(xf, self.weight.to(ct).view(shape), self.bias.to(ct).view(shape), a, S0, T0, lam,
                                 self.eps, self.clamp)
            if in_dtype in (torch.float16, torch.bfloat16):
                lim = torch.finfo(in_dtype).max
                y = y.clamp(-lim, lim)
        return y.to(in_dtype)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, dim={self.dim}, poly_order={self.poly_order}, "
                f"restoration={self.restoration!r}, num_domains={self.num_domains}, clamp={self.clamp}")

    # -- adaptation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _append_domains(self, n_new: int, init_from: int) -> None:
        self.num_domains += n_new
        if self.restoration != "domain":
            return
        for name in ("domain_gamma", "domain_beta"):
            p = getattr(self, name)
            new = torch.cat([p.data, p.data[init_from:init_from + 1].repeat(n_new, 1)], 0)
            setattr(self, name, nn.Parameter(new, requires_grad=p.requires_grad))


class UHarmonyNorm2d(UHarmonyNorm):
    """``UHarmonyNorm`` for (B, C, X, Y); same call signature as ``nn.InstanceNorm2d``."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = False, device=None, dtype=None, **kwargs):
        kwargs.pop("dim", None)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, dim=2, **kwargs)


class UHarmonyNorm3d(UHarmonyNorm):
    """``UHarmonyNorm`` for (B, C, X, Y, Z); same call signature as ``nn.InstanceNorm3d``."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = False, device=None, dtype=None, **kwargs):
        kwargs.pop("dim", None)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, dim=3, **kwargs)


def uharmony_norms(network: nn.Module) -> Iterator[UHarmonyNorm]:
    """All ``UHarmonyNorm`` layers of ``network`` (each once)."""
    for m in network.modules():
        if isinstance(m, UHarmonyNorm):
            yield m


def set_gate(network: nn.Module, gate: Optional[torch.Tensor]) -> None:
    """Write the (B, D) gate weights into every ``UHarmonyNorm`` of ``network`` (None = uniform)."""
    for m in uharmony_norms(network):
        m.current_gate = gate


@contextlib.contextmanager
def gate_context(network: nn.Module, gate: Optional[torch.Tensor]):
    """``with gate_context(net, g): net(x)`` sets the gate for the block and clears it afterwards."""
    set_gate(network, gate)
    try:
        yield
    finally:
        set_gate(network, None)


# ----------------------------------------------------------------------------------------------------------
# insertion depth
# ----------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------
# domain gate
# ----------------------------------------------------------------------------------------------------------
class GateEncoder(nn.Module):
    """Lightweight gate encoder on the raw input: ``depth`` x (conv k3 s2 -> LeakyReLU), no normalization.

    x: (B, C_in, *spatial) -> (B, out_channels, *spatial / 2**depth). It has no normalization layer on
    purpose: the intensity statistics that instance normalization removes are the gate's main cue.
    """

    def __init__(self, in_channels: int, dim: int = 3, features: int = 16, depth: int = 3):
        super().__init__()
        if in_channels < 1 or features < 1 or depth < 1:
            raise ValueError("in_channels, features and depth must be >= 1")
        conv = _conv_op(dim)
        layers, c = [], in_channels
        for i in range(depth):
            out = features * 2 ** min(i, 2)
            layers += [conv(c, out, 3, 2, 1, bias=True), nn.LeakyReLU(0.01, inplace=True)]
            c = out
        self.layers = nn.Sequential(*layers)
        self.in_channels = in_channels
        self.out_channels = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    @property
    def input_conv(self) -> nn.Module:
        return self.layers[0]


class DomainGate(nn.Module):
    """Soft domain gate over learnable prototypes.

    features (B, C, *spatial) or (B, C) -> z = GAP -> u = W z + c (C -> C') ->
    logits_d = cos(u, P_d) / tau + bias_d, g = softmax(logits). Returns (g, logits), both (B, D), float32.

    ``bias`` (D) is a learnable per-domain logit offset (zero-init); it lets ``add_domains`` split a domain
    into copies without changing any output.
    """

    def __init__(self, in_channels: int, num_domains: int, temperature: float = 0.1, proj_dim: Optional[int] = None):
        super().__init__()
        if in_channels < 1 or num_domains < 1:
            raise ValueError("in_channels and num_domains must be >= 1")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        proj_dim = proj_dim or max(8, min(in_channels, 64))
        self.in_channels = in_channels
        self.num_domains = num_domains
        self.temperature = temperature
        self.proj = nn.Linear(in_channels, proj_dim)
        self.prototypes = nn.Parameter(F.normalize(torch.randn(num_domains, proj_dim), dim=1))
        self.bias = nn.Parameter(torch.zeros(num_domains))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = features.flatten(2).mean(-1) if features.ndim > 2 else features  # (B, C)
        u = self.proj(z)
        with _no_autocast(u.device.type):
            cos = F.normalize(u.float(), dim=1, eps=1e-6) @ F.normalize(self.prototypes.float(), dim=1, eps=1e-6).t()
            logits = cos / self.temperature + self.bias.float()
            g = torch.softmax(logits, dim=1)
        return g, logits

    @torch.no_grad()
    def _append_domains(self, n_new: int, init_from: int) -> None:
        p, b = self.prototypes, self.bias
        protos = torch.cat([p.data, p.data[init_from:init_from + 1].repeat(n_new, 1)], 0)
        bias = torch.cat([b.data, b.data[init_from:init_from + 1].repeat(n_new)], 0)
        # split the mass of domain `init_from` evenly over it and its copies: softmax outputs are unchanged
        shift = math.log(n_new + 1)
        bias[init_from] -= shift
        bias[-n_new:] -= shift
        self.prototypes = nn.Parameter(protos, requires_grad=p.requires_grad)
        self.bias = nn.Parameter(bias, requires_grad=b.requires_grad)
        self.num_domains += n_new


class GatedHeads(nn.Module):
    """Per-domain 1x1 segmentation heads at every deep-supervision scale, mixed by the gate.

    Scale s has ``weight_s`` (D, K, C_s) and ``bias_s`` (D, K); for features f (B, C_s, *spatial) and gate
    g (B, D): logits = sum_d g_d * Head_d(f) = (sum_d g_d W_d) f + sum_d g_d b_d, computed through the
    per-sample mixed weight (cost of one head, not D). Scales are indexed like ``UNetDecoder.seg_layers``
    (0 = lowest resolution).
    """

    def __init__(self, in_channels: Sequence[int], num_outputs: int, num_domains: int):
        super().__init__()
        if num_outputs < 1 or num_domains < 1 or not in_channels:
            raise ValueError("need num_outputs >= 1, num_domains >= 1 and at least one scale")
        self.in_channels = list(in_channels)
        self.num_outputs = num_outputs
        self.num_domains = num_domains
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for c in self.in_channels:
            w = torch.empty(num_domains, num_outputs, c)
            for d in range(num_domains):
                nn.init.kaiming_normal_(w[d], a=1e-2)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.zeros(num_domains, num_outputs)))

    @classmethod
    def from_seg_layers(cls, seg_layers: Iterable[nn.Module], num_domains: int) -> "GatedHeads":
        """Every domain head starts as a copy of the backbone's 1x1 seg layer at that scale."""
        seg_layers = list(seg_layers)
        heads = cls([s.in_channels for s in seg_layers], seg_layers[0].out_channels, num_domains)
        with torch.no_grad():
            for s, layer in enumerate(seg_layers):
                w = layer.weight.reshape(layer.out_channels, layer.in_channels)
                heads.weights[s].copy_(w.unsqueeze(0).expand(num_domains, -1, -1))
                b = layer.bias if layer.bias is not None else torch.zeros(layer.out_channels)
                heads.biases[s].copy_(b.unsqueeze(0).expand(num_domains, -1))
        return heads

    def forward(self, features: torch.Tensor, gate: torch.Tensor, scale: int) -> torch.Tensor:
        """features (B, C_s, *spatial), gate (B, D) -> logits (B, K, *spatial)."""
        w, b = self.weights[scale], self.biases[scale]
        g = gate.to(w.dtype)
        wb = torch.einsum("bd,dkc->bkc", g, w)  # (B, K, C): per-sample mixed head
        bb = g @ b  # (B, K)
        B, C = features.shape[:2]
        out = torch.bmm(wb.to(features.dtype), features.reshape(B, C, -1)) + bb.to(features.dtype).unsqueeze(-1)
        return out.reshape(B, -1, *features.shape[2:])

    @torch.no_grad()
    def _append_domains(self, n_new: int, init_from: int) -> None:
        for plist in (self.weights, self.biases):
            for s in range(len(plist)):
                p = plist[s]
                new = torch.cat([p.data, p.data[init_from:init_from + 1].repeat(n_new, *([1] * (p.ndim - 1)))], 0)
                plist[s] = nn.Parameter(new, requires_grad=p.requires_grad)
        self.num_domains += n_new

    @torch.no_grad()
    def _append_outputs(self, n_new: int) -> None:
        for s in range(len(self.weights)):
            w, b = self.weights[s], self.biases[s]
            D, _, C = w.shape
            extra = torch.empty(D, n_new, C, dtype=w.dtype, device=w.device)
            for d in range(D):
                nn.init.kaiming_normal_(extra[d], a=1e-2)
            self.weights[s] = nn.Parameter(torch.cat([w.data, extra], 1), requires_grad=w.requires_grad)
            self.biases[s] = nn.Parameter(torch.cat([b.data, b.data.new_zeros(D, n_new)], 1),
                                          requires_grad=b.requires_grad)
        self.num_outputs += n_new


# ----------------------------------------------------------------------------------------------------------
# network
# ----------------------------------------------------------------------------------------------------------
class UHarmonyNet(nn.Module):
    """A dynamic_network_architectures U-Net with U-Harmony norms, a domain gate and gated heads.

    Args:
        backbone: PlainConvUNet or ResidualEncoderUNet (2D/3D) built with InstanceNorm; it is modified in
            place (norms replaced, its ``decoder.seg_layers`` turned into the gated heads) and its encoder and
            decoder become this module's ``encoder`` / ``decoder``.
        num_domains: D.
        restoration, poly_order, clamp, init_restore_mix: ``UHarmonyNorm`` options.
        stages: insertion depth (``replace_norms`` grammar).
        gate_temperature: tau of the cosine gate.
        deep_supervision: None keeps the backbone's setting; nnU-Net toggles ``decoder.deep_supervision``.
        gate_source: 'input' (default): a ``GateEncoder`` on the raw input computes g BEFORE the backbone runs,
            so the R2 norms and the heads use the same g; 'bottleneck': g from GAP of the bottleneck features
            (the notes' first option; only with restoration 'instance'/'none', since R2 needs g earlier).
        gate_features, gate_depth: size of the gate encoder; gate_dim: C' of the gate projection.
        head_init: 'copy' (every Head_d = the backbone's seg layer, so the network equals the backbone
            with InstanceNorm at initialisation) or 'random' (independent He init per domain).

    forward(x, *, domain_id=None, gate_mode=None, cond=None) -> logits (list over DS scales, highest
    resolution first, or one tensor with DS off). gate_mode: 'soft' (default; predicted g), 'oracle'
    (g = one_hot(domain_id)), 'uniform' (g = 1/D). ``cond['domain_id']`` is used when domain_id is None.
    After each call ``last_gate_logits`` (B, D) holds the gate logits (for ``gate_loss``) and
    ``last_gate`` (B, D) the weights actually used. ``set_inference_condition`` binds a default mode /
    domain for callers that only do ``network(x)`` (nnU-Net's predictor).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_domains: int,
        restoration: str = "instance",
        poly_order: int = 3,
        stages: str = "all",
        gate_temperature: float = 0.1,
        deep_supervision: Optional[bool] = None,
        *,
        gate_source: str = "input",
        gate_features: int = 16,
        gate_depth: int = 3,
        gate_dim: Optional[int] = None,
        clamp: Optional[float] = 6.0,
        init_restore_mix: float = 0.0,
        head_init: str = "copy",
    ):
        super().__init__()
        if not (hasattr(backbone, "encoder") and hasattr(backbone, "decoder")
                and hasattr(backbone.decoder, "seg_layers") and hasattr(backbone.decoder, "transpconvs")):
            raise TypeError("backbone must be a dynamic_network_architectures PlainConvUNet/ResidualEncoderUNet")
        if gate_source not in GATE_SOURCES:
            raise ValueError(f"gate_source must be one of {GATE_SOURCES}, got {gate_source!r}")
        if gate_source == "bottleneck" and restoration == "domain":
            raise ValueError("restoration='domain' needs the gate before the encoder runs: use gate_source='input'")
        if head_init not in ("copy", "random"):
            raise ValueError(f"head_init must be 'copy' or 'random', got {head_init!r}")
        if num_domains < 1:
            raise ValueError(f"num_domains must be >= 1, got {num_domains}")
        encoder, decoder = backbone.encoder, backbone.decoder
        self.dim = 3 if encoder.conv_op is nn.Conv3d else 2
        self.num_domains = num_domains
        self.restoration = restoration
        self.poly_order = poly_order
        self.stages = stages
        self.gate_source = gate_source
        self.replaced_norms = replace_norms(
            backbone, stages, poly_order=poly_order, restoration=restoration, num_domains=num_domains,
            clamp=clamp, init_restore_mix=init_restore_mix)
        self.encoder = encoder
        self.decoder = decoder
        if deep_supervision is not None:
            self.decoder.deep_supervision = deep_supervision
        first = _first_conv(encoder)
        self.input_channels = first.in_channels
        self.num_classes = decoder.num_classes

        if head_init == "copy":
            self.heads = GatedHeads.from_seg_layers(decoder.seg_layers, num_domains)
        else:
            self.heads = GatedHeads([s.in_channels for s in decoder.seg_layers], decoder.num_classes, num_domains)
        decoder.seg_layers = nn.ModuleList()  # replaced by the heads (no unused parameters under DDP)

        if gate_source == "input":
            self.gate_encoder = GateEncoder(self.input_channels, self.dim, gate_features, gate_depth)
            gate_in = self.gate_encoder.out_channels
        else:
            self.gate_encoder = None
            gate_in = encoder.output_channels[-1]
        self.gate = DomainGate(gate_in, num_domains, gate_temperature, gate_dim)
        self.gate_mode = "soft"
        self.inference_domain_id: Optional[torch.Tensor] = None
        self.last_gate_logits: Optional[torch.Tensor] = None
        self.last_gate: Optional[torch.Tensor] = None

    # -- conditioning ----------------------------------------------------------------------------------
    def set_inference_condition(self, cond: Optional[dict] = None, *, domain_id=None, gate_mode: Optional[str] = None):
        """Default gate mode / domain for ``network(x)`` calls (e.g. oracle prediction of a known dataset)."""
        if cond is not None and domain_id is None:
            domain_id = cond.get("domain_id")
        if gate_mode is not None:
            if gate_mode not in GATE_MODES:
                raise ValueError(f"gate_mode must be one of {GATE_MODES}, got {gate_mode!r}")
            self.gate_mode = gate_mode
        self.inference_domain_id = None if domain_id is None else torch.as_tensor(domain_id).long()

    def _select_gate(self, soft: torch.Tensor, mode: str, domain_id) -> torch.Tensor:
        if mode == "soft":
            return soft
        if mode == "uniform":
            return torch.full_like(soft, 1.0 / self.num_domains)
        if domain_id is None:
            raise ValueError("gate_mode='oracle' needs domain_id (argument, cond or set_inference_condition)")
        d = torch.as_tensor(domain_id, device=soft.device).long().reshape(-1)
        if d.numel() == 1:
            d = d.expand(soft.shape[0])
        if d.shape[0] != soft.shape[0]:
            raise ValueError(f"domain_id has {d.shape[0]} entries for a batch of {soft.shape[0]}")
        if (d < 0).any() or (d >= self.num_domains).any():
            raise ValueError(f"domain_id out of range [0, {self.num_domains})")
        return F.one_hot(d, self.num_domains).to(soft.dtype)

    # -- forward ---------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *, domain_id=None, gate_mode: Optional[str] = None, cond: Optional[dict] = None):
        mode = gate_mode or self.gate_mode
        if mode not in GATE_MODES:
            raise ValueError(f"gate_mode must be one of {GATE_MODES}, got {mode!r}")
        if domain_id is None and cond is not None:
            domain_id = cond.get("domain_id")
        if domain_id is None:
            domain_id = self.inference_domain_id
        try:
            if self.gate_encoder is not None:
                soft, logits = self.gate(self.gate_encoder(x))
                g = self._select_gate(soft, mode, domain_id)
                set_gate(self.encoder, g)
                set_gate(self.decoder.stages, g)
                skips = self.encoder(x)
            else:
                skips = self.encoder(x)
                soft, logits = self.gate(skips[-1])
                g = self._select_gate(soft, mode, domain_id)
            self.last_gate_logits, self.last_gate = logits, g
            return self._decode(skips, g)
        finally:
            set_gate(self.encoder, None)
            set_gate(self.decoder.stages, None)

    def _decode(self, skips: list[torch.Tensor], g: torch.Tensor):
        dec = self.decoder
        lres, outs, n = skips[-1], [], len(dec.stages)
        for s in range(n):
            x = dec.transpconvs[s](lres)
            x = dec.stages[s](torch.cat((x, skips[-(s + 2)]), 1))
            if dec.deep_supervision or s == n - 1:
                outs.append(self.heads(x, g, s))
            lres = x
        outs = outs[::-1]
        return outs if dec.deep_supervision else outs[0]

    def gate_loss(self, domain_id: torch.Tensor) -> torch.Tensor:
        """Auxiliary CE between the last forward's gate logits and the true domain ids (B,)."""
        if self.last_gate_logits is None:
            raise RuntimeError("call forward first")
        return F.cross_entropy(self.last_gate_logits, domain_id.to(self.last_gate_logits.device).long())

    def predicted_domain(self) -> Optional[torch.Tensor]:
        """argmax of the last gate logits (B,) (the 'dataset-free' domain prediction)."""
        return None if self.last_gate_logits is None else self.last_gate_logits.argmax(1)

    def compute_conv_feature_map_size(self, input_size):
        return self.encoder.compute_conv_feature_map_size(input_size) + \
            self.decoder.compute_conv_feature_map_size(input_size)


# ----------------------------------------------------------------------------------------------------------
# adaptation (universal modality / class adaptation)
# ----------------------------------------------------------------------------------------------------------
def _first_conv(encoder: nn.Module) -> nn.Module:
    stem = getattr(encoder, "stem", None)
    root = stem if stem is not None else encoder.stages[0]
    for m in root.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            return m
    raise ValueError("no input convolution found")


def _input_convs(network: nn.Module) -> list[nn.Module]:
    convs = []
    if isinstance(network, UHarmonyNet):
        convs.append(_first_conv(network.encoder))
        if network.gate_encoder is not None:
            convs.append(network.gate_encoder.input_conv)
    elif hasattr(network, "encoder"):
        convs.append(_first_conv(network.encoder))
    else:
        convs.append(next(m for m in network.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))))
    return convs


@torch.no_grad()
def widen_input_channels(network: nn.Module, new_in_channels: int) -> nn.Module:
    """Widen every input convolution to ``new_in_channels``; the new input weights are zero, so outputs for
    inputs whose old channels are unchanged stay identical whatever the new channels hold. In place."""
    for conv in _input_convs(network):
        old = conv.in_channels
        if new_in_channels < old:
            raise ValueError(f"cannot shrink input channels from {old} to {new_in_channels}")
        if new_in_channels == old:
            continue
        w = conv.weight
        extra = w.new_zeros(w.shape[0], new_in_channels - old, *w.shape[2:])
        conv.weight = nn.Parameter(torch.cat([w.data, extra], 1), requires_grad=w.requires_grad)
        conv.in_channels = new_in_channels
    if hasattr(network, "input_channels"):
        network.input_channels = new_in_channels
    if isinstance(network, UHarmonyNet) and network.gate_encoder is not None:
        network.gate_encoder.in_channels = new_in_channels
    return network


@torch.no_grad()
def add_domains(network: UHarmonyNet, n_new: int, init_from: int = 0) -> UHarmonyNet:
    """Append ``n_new`` domains: prototypes, heads and R2 (gamma, beta) are copies of domain ``init_from``
    and the gate logit bias of ``init_from`` and its copies is lowered by log(n_new + 1), which splits its
    gate mass evenly: every output (soft, oracle for old ids, uniform excepted) is unchanged. Existing
    parameters keep their values (their Parameter objects are replaced; rebuild the optimizer). In place."""
    if not isinstance(network, UHarmonyNet):
        raise TypeError("add_domains needs a UHarmonyNet")
    if n_new < 1:
        raise ValueError("n_new must be >= 1")
    if not 0 <= init_from < network.num_domains:
        raise ValueError(f"init_from must be in [0, {network.num_domains})")
    network.gate._append_domains(n_new, init_from)
    network.heads._append_domains(n_new, init_from)
    for m in uharmony_norms(network):
        m._append_domains(n_new, init_from)
    network.num_domains += n_new
    return network


@torch.no_grad()
def add_output_tasks(network: UHarmonyNet, n_new: int) -> UHarmonyNet:
    """Append ``n_new`` output channels (new tasks) to every domain head at every scale (He init, zero bias);
    the old channels' logits are unchanged. In place."""
    if not isinstance(network, UHarmonyNet):
        raise TypeError("add_output_tasks needs a UHarmonyNet")
    if n_new < 1:
        raise ValueError("n_new must be >= 1")
    network.heads._append_outputs(n_new)
    network.num_classes += n_new
    network.decoder.num_classes = network.num_classes
    return network


def adaptation_parameters(network: nn.Module, include_input_conv: bool = True) -> list[nn.Parameter]:
    """The fine-tune subset for adaptation: every UHarmonyNorm parameter (polynomial, restoration), the
    domain gate (projection, prototypes, logit bias), the gated heads and (optionally) the input
    convolutions of the backbone and of the gate encoder. Each parameter once."""
    params, seen = [], set()

    def add(ps):
        for p in ps:
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)

    for m in uharmony_norms(network):
        add(m.parameters())
    if isinstance(network, UHarmonyNet):
        add(network.gate.parameters())
        add(network.heads.parameters())
    if include_input_conv:
        for conv in _input_convs(network):
            add(conv.parameters())
    return params


def freeze_for_adaptation(network: nn.Module, include_input_conv: bool = True) -> list[nn.Parameter]:
    """Set requires_grad=False on everything but ``adaptation_parameters``; return the trainable ones."""
    keep = adaptation_parameters(network, include_input_conv)
    ids = {id(p) for p in keep}
    for p in network.parameters():
        p.requires_grad_(id(p) in ids)
    return keep
