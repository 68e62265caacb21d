"""The harmonization layer: :class:`UHarmonyNorm` (2D/3D), a drop-in ``norm_op`` (stage 1 standardization,
polynomial affine, stage 2 restoration), and the gate context that R2 layers read."""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch
from torch import nn
from torch.nn.modules.instancenorm import _InstanceNorm


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
