"""CrossConv: one convolution applied to every (x_i, y_j) pair of two sets of feature maps.

UniverSeg's interaction operator (Butoi, Gonzalez Ortiz et al., ICCV 2023). Given a set
``x`` of ``Sx`` maps with ``Cx`` channels and a set ``y`` of ``Sy`` maps with ``Cy`` channels,
the output holds, for every pair ``(i, j)``, ``conv(concat(x_i, y_j))`` with the SAME
weights for all pairs::

    x   (B, Sx, Cx, *spatial)
    y   (B, Sy, Cy, *spatial)
    out (B, Sx, Sy, Co, *spatial)     out[:, i, j] = conv(cat([x[:, i], y[:, j]], dim=1))

Because the weights are shared, the layer is permutation-equivariant over both sets.

One class serves 2D and 3D (``dim`` in {2, 3}); :class:`CrossConv2d` and
:class:`CrossConv3d` are the same class with ``dim`` fixed.

Implementation note (differs from the released code, same result): a convolution is linear
in its input channels, so ``conv(cat(x_i, y_j)) = conv_x(x_i) + conv_y(y_j) + bias`` with
``conv_x``/``conv_y`` the weight slices for the ``Cx`` and ``Cy`` input channels. We run
``Sx`` convolutions over ``x`` and ``Sy`` over ``y`` and broadcast-add, instead of
``Sx * Sy`` convolutions over a materialized ``(B, Sx, Sy, Cx + Cy, ...)`` tensor. The output
is equal up to floating-point rounding; the weight keeps the released layout
``(Co, Cx + Cy, *kernel)`` (x channels first) so released state dicts load unchanged.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

IntOrPair = Union[int, Tuple[int, int], Sequence[int]]

_CONV_FNS = {2: F.conv2d, 3: F.conv3d}


def as_pair(value: IntOrPair, name: str = "value") -> Tuple[int, int]:
    """``3 -> (3, 3)``; ``(1, 2) -> (1, 2)``. Raises ValueError unless positive ints."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        pair = (value, value)
    else:
        pair = tuple(value)
        if len(pair) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"{name} must hold positive ints, got {value!r}")
    return pair  # type: ignore[return-value]


def _check_dim(dim: int) -> int:
    if dim not in (2, 3):
        raise ValueError(f"dim must be 2 or 3, got {dim!r}")
    return dim


class CrossConv(nn.Module):
    """Shared convolution over all pairs of two sets: ``(B,Sx,Cx,*sp) x (B,Sy,Cy,*sp) -> (B,Sx,Sy,Co,*sp)``.

    Args:
        in_channels: ``(Cx, Cy)``, or one int used for both.
        out_channels: ``Co``.
        kernel_size: odd int, same size along every spatial axis.
        dim: number of spatial dimensions, 2 or 3.
        padding: defaults to ``kernel_size // 2`` ("same" output size).
        bias: learn an additive bias.
        init_nonlinearity: the activation that follows (``None`` = linear, ``"LeakyReLU"``),
            used for the kaiming-normal gain; bias starts at zero.

    Parameters: ``weight (Co, Cx + Cy, *kernel)``, ``bias (Co,)``.
    Cost: ``Sx + Sy`` convolutions (see module docstring), memory of the output ``O(Sx * Sy)``.
    """

    def __init__(
        self,
        in_channels: IntOrPair,
        out_channels: int,
        kernel_size: int = 3,
        *,
        dim: int = 2,
        padding: Optional[int] = None,
        bias: bool = True,
        init_nonlinearity: Optional[str] = None,
    ):
        super().__init__()
        self.dim = _check_dim(dim)
        self.in_channels = as_pair(in_channels, "in_channels")
        if not isinstance(out_channels, int) or isinstance(out_channels, bool) or out_channels <= 0:
            raise ValueError(f"out_channels must be a positive int, got {out_channels!r}")
        if not isinstance(kernel_size, int) or kernel_size <= 0 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
        if padding is None:
            padding = kernel_size // 2
        if not isinstance(padding, int) or padding < 0:
            raise ValueError(f"padding must be a non-negative int, got {padding!r}")
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.padding = padding
        self.init_nonlinearity = init_nonlinearity
        cx, cy = self.in_channels
        self.weight = nn.Parameter(torch.empty(out_channels, cx + cy, *([kernel_size] * dim)))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal weight (gain of ``init_nonlinearity``), zero bias."""
        nonlin = _torch_nonlinearity_name(self.init_nonlinearity)
        nn.init.kaiming_normal_(self.weight, nonlinearity=nonlin)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (B,Sx,Cx,*sp), y (B,Sy,Cy,*sp) -> (B,Sx,Sy,Co,*sp)."""
        cx, cy = self.in_channels
        nd = 3 + self.dim
        if x.ndim != nd or y.ndim != nd:
            raise ValueError(
                f"CrossConv(dim={self.dim}) expects x (B,Sx,Cx,*{self.dim} spatial) and y (B,Sy,Cy,*spatial); "
                f"got x {tuple(x.shape)}, y {tuple(y.shape)}"
            )
        if x.shape[0] != y.shape[0] or x.shape[3:] != y.shape[3:]:
            raise ValueError(f"batch and spatial sizes of x {tuple(x.shape)} and y {tuple(y.shape)} differ")
        if x.shape[2] != cx or y.shape[2] != cy:
            raise ValueError(f"expected {cx} channels in x and {cy} in y, got {x.shape[2]} and {y.shape[2]}")
        B, Sx, Sy = x.shape[0], x.shape[1], y.shape[1]
        conv = _CONV_FNS[self.dim]
        # conv(cat(x_i, y_j)) = conv_x(x_i) + conv_y(y_j) + b  (linearity in the input channels)
        zx = conv(rearrange(x, "B S C ... -> (B S) C ..."), self.weight[:, :cx], self.bias, padding=self.padding)
        zy = conv(rearrange(y, "B S C ... -> (B S) C ..."), self.weight[:, cx:], None, padding=self.padding)
        zx = rearrange(zx, "(B Sx) C ... -> B Sx 1 C ...", B=B, Sx=Sx)
        zy = rearrange(zy, "(B Sy) C ... -> B 1 Sy C ...", B=B, Sy=Sy)
        return zx + zy

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, kernel_size={self.kernel_size}, "
            f"dim={self.dim}, padding={self.padding}, bias={self.bias is not None}"
        )


class CrossConv2d(CrossConv):
    """:class:`CrossConv` with ``dim=2``: ``(B,Sx,Cx,H,W) x (B,Sy,Cy,H,W) -> (B,Sx,Sy,Co,H,W)``."""

    def __init__(self, in_channels: IntOrPair, out_channels: int, kernel_size: int = 3, **kwargs):
        super().__init__(in_channels, out_channels, kernel_size, dim=2, **kwargs)


class CrossConv3d(CrossConv):
    """:class:`CrossConv` with ``dim=3``: ``(B,Sx,Cx,D,H,W) x (B,Sy,Cy,D,H,W) -> (B,Sx,Sy,Co,D,H,W)``."""

    def __init__(self, in_channels: IntOrPair, out_channels: int, kernel_size: int = 3, **kwargs):
        super().__init__(in_channels, out_channels, kernel_size, dim=3, **kwargs)


def _torch_nonlinearity_name(name: Optional[str]) -> str:
    """Map a module name (``"LeakyReLU"``, ``None``) to the name ``torch.nn.init`` gains use."""
    if name is None:
        return "linear"
    names = {"leakyrelu": "leaky_relu", "leaky_relu": "leaky_relu", "relu": "relu", "linear": "linear",
             "identity": "linear", "tanh": "tanh", "sigmoid": "sigmoid"}
    try:
        return names[name.lower()]
    except KeyError:
        raise ValueError(f"unknown nonlinearity {name!r}; expected one of {sorted(names)} or None") from None

