"""UniverSeg: in-context segmentation with a CrossBlock U-Net, in 2D and 3D.

Butoi*, Gonzalez Ortiz* et al., "UniverSeg: Universal Medical Image Segmentation", ICCV 2023.
A query ("target") image and a support set of (image, label) pairs define a binary task; the
network predicts the query's label without any task-specific training::

    target_image   (B, C, *sp)       C = in_channels (1 in the release)
    support_images (B, S, C, *sp)
    support_labels (B, S, 1, *sp)
    -> logits      (B, 1, *sp)       apply a sigmoid for probabilities

Structure (the released v1 code, ``JJGO/UniverSeg`` model.py, re-implemented):

- ``CrossBlock``: ``z_i = CrossConv(u, v_i)`` (no activation), ``u' = act(conv_u(mean_i z_i))``,
  ``v'_i = act(conv_v(z_i))`` with separate 3x3 convs and LeakyReLU(0.01).
- encoder: CrossBlocks with max-pooling (x2) between them, applied to both streams;
- decoder: per block, x2 (bi/tri)linear upsampling (align_corners=True) of both streams,
  concatenation with the encoder skip along channels, then a CrossBlock;
- output: 1x1 conv on the target stream, no activation.

``UniverSeg()`` (2D, widths 64) has exactly 1,182,785 parameters and its state-dict keys
(``enc_blocks.K.cross.cross_conv.weight``, ``enc_blocks.K.target.vmapped.conv.weight``,
``out_conv.conv.weight``, ...) are those of the release, so released weights load with
``load_state_dict``. ``dim=3`` builds the same structure with Conv3d / MaxPool3d / trilinear
upsampling (no released weights exist for it).

Properties: the support set size ``S`` is free at run time, and the output does not depend on
the order of the support set (support stream permutation-equivariant, target reads it only
through a mean). Memory and compute grow as ``O(S)`` per layer: every layer holds ``S``
support feature maps at its resolution (plus the query), so training with S = 64 at 128^2
costs roughly 65x a plain U-Net of the same width; in 3D keep S and the patch small.

Differences from the release (outputs identical up to float rounding):

- ``CrossConv`` computes the pair convolution as ``conv_x(x) + conv_y(y)`` (see cross_conv.py).
- The last block's support-stream conv is not evaluated, because its result never reaches the
  output (the release computes and discards it). Its parameters exist (they are counted in the
  1,182,785 and load from released weights) but never receive a gradient, as in the release:
  under DDP use ``find_unused_parameters=True`` or exclude them.
- Input channels are configurable (``in_channels``); inputs are validated and spatial sizes must
  be divisible by ``2 ** (len(encoder_blocks) - 1)`` (ValueError otherwise; the release fails
  later on a shape mismatch in the skip concatenation).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from einops import rearrange
from torch import nn

from nnharmony.networks.cross_conv import CrossConv, IntOrPair, _check_dim, _torch_nonlinearity_name, as_pair

__all__ = ["Vmap", "ConvOp", "CrossOp", "CrossBlock", "UniverSeg"]

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_UPSAMPLE_MODE = {2: "bilinear", 3: "trilinear"}


def vmap(module, x: torch.Tensor) -> torch.Tensor:
    """Apply a per-image ``module`` to a set: ``(B, S, *rest) -> (B, S, *rest_out)``.

    Folds ``S`` into the batch axis, so ``module`` sees ``(B*S, *rest)``.
    """
    B, S = x.shape[:2]
    y = module(rearrange(x, "B S ... -> (B S) ..."))
    return rearrange(y, "(B S) ... -> B S ...", B=B, S=S)


class Vmap(nn.Module):
    """Module wrapper around :func:`vmap`: ``(B, S, C, *sp) -> (B, S, C', *sp')``.

    The wrapped module is stored as ``vmapped`` (released state-dict layout).
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise ValueError(f"Vmap wraps an nn.Module, got {type(module).__name__}")
        self.vmapped = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return vmap(self.vmapped, x)


class ConvOp(nn.Module):
    """Conv (odd kernel, "same" padding, bias) + optional LeakyReLU(0.01): ``(N, Ci, *sp) -> (N, Co, *sp)``.

    Args:
        in_channels, out_channels: ``Ci``, ``Co``.
        kernel_size: odd int.
        dim: 2 or 3.
        nonlinearity: ``"LeakyReLU"`` (slope 0.01) or ``None``.

    Init: kaiming-normal weight with the gain of ``nonlinearity``, zero bias.
    Submodules ``conv`` (and ``nonlin``) as in the release.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        dim: int = 2,
        nonlinearity: Optional[str] = "LeakyReLU",
    ):
        super().__init__()
        _check_dim(dim)
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(kernel_size, int) or kernel_size <= 0 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
        if nonlinearity not in (None, "LeakyReLU"):
            raise ValueError(f"nonlinearity must be 'LeakyReLU' or None, got {nonlinearity!r}")
        self.conv = _CONV[dim](in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=True)
        self.nonlin = nn.LeakyReLU(0.01) if nonlinearity is not None else None
        nn.init.kaiming_normal_(self.conv.weight, nonlinearity=_torch_nonlinearity_name(nonlinearity))
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return self.nonlin(x) if self.nonlin is not None else x


class CrossOp(nn.Module):
    """CrossConv between the target and each support entry, then the mean for the target.

    ``target (B,1,Cx,*sp), support (B,S,Cy,*sp) -> new_target (B,1,Co,*sp), interaction (B,S,Co,*sp)``
    with ``interaction[:, i] = CrossConv(target, support_i)`` and ``new_target`` its mean over S.

    Args:
        in_channels: ``(Cx, Cy)`` or one int.
        out_channels: ``Co``.
        kernel_size, dim: as in :class:`CrossConv`.
        nonlinearity: ``None`` (the release's UniverSeg) or ``"LeakyReLU"`` (paper formula),
            applied to the interaction before the mean.
    """

    def __init__(
        self,
        in_channels: IntOrPair,
        out_channels: int,
        kernel_size: int = 3,
        *,
        dim: int = 2,
        nonlinearity: Optional[str] = None,
    ):
        super().__init__()
        if nonlinearity not in (None, "LeakyReLU"):
            raise ValueError(f"nonlinearity must be 'LeakyReLU' or None, got {nonlinearity!r}")
        self.cross_conv = CrossConv(
            in_channels, out_channels, kernel_size, dim=dim, init_nonlinearity=nonlinearity
        )
        self.nonlin = nn.LeakyReLU(0.01) if nonlinearity is not None else None

    def forward(self, target: torch.Tensor, support: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if target.shape[1] != 1:
            raise ValueError(f"CrossOp expects one target per episode (B,1,C,...), got {tuple(target.shape)}")
        interaction = self.cross_conv(target, support).squeeze(1)  # (B, S, Co, *sp)
        if self.nonlin is not None:
            interaction = self.nonlin(interaction)
        return interaction.mean(dim=1, keepdim=True), interaction


class CrossBlock(nn.Module):
    """UniverSeg block: ``target (B,1,Cx,*sp), support (B,S,Cy,*sp) -> (B,1,F,*sp), (B,S,F,*sp)``.

    ``z_i = CrossConv(target, support_i)`` (Co = ``cross_features``, no activation unless
    ``cross_nonlinearity``), ``target' = LeakyReLU(conv_t(mean_i z_i))``,
    ``support'_i = LeakyReLU(conv_s(z_i))``; ``conv_t``/``conv_s`` are separate 3x3 convs with
    F = ``conv_features`` (defaults to ``cross_features``) outputs.

    Args:
        in_channels: ``(Cx, Cy)`` or one int for both streams.
        cross_features: CrossConv output channels.
        conv_features: output channels of the block (default ``cross_features``).
        dim: 2 or 3.
        cross_nonlinearity: ``None`` (release) or ``"LeakyReLU"`` (paper formula).

    Cost: ``O(S)`` convolutions and feature maps.
    """

    def __init__(
        self,
        in_channels: IntOrPair,
        cross_features: int,
        conv_features: Optional[int] = None,
        *,
        dim: int = 2,
        cross_nonlinearity: Optional[str] = None,
    ):
        super().__init__()
        conv_features = cross_features if conv_features is None else conv_features
        self.in_channels = as_pair(in_channels, "in_channels")
        self.out_channels = conv_features
        self.dim = _check_dim(dim)
        self.cross = CrossOp(self.in_channels, cross_features, dim=dim, nonlinearity=cross_nonlinearity)
        self.target = Vmap(ConvOp(cross_features, conv_features, dim=dim))
        self.support = Vmap(ConvOp(cross_features, conv_features, dim=dim))

    def forward(
        self, target: torch.Tensor, support: torch.Tensor, *, compute_support: bool = True
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Returns ``(target', support')``; ``support'`` is None when ``compute_support=False``."""
        target, interaction = self.cross(target, support)
        target = self.target(target)
        support = self.support(interaction) if compute_support else None
        return target, support


def _widths(blocks: Sequence[IntOrPair], name: str) -> List[Tuple[int, int]]:
    if isinstance(blocks, (int, str)) or not isinstance(blocks, Sequence):
        raise ValueError(f"{name} must be a sequence of ints or (cross, conv) pairs, got {blocks!r}")
    return [as_pair(b, f"{name}[{i}]") for i, b in enumerate(blocks)]


class UniverSeg(nn.Module):
    """In-context segmentation network (2D or 3D).

    ``forward(target_image (B,C,*sp), support_images (B,S,C,*sp), support_labels (B,S,1,*sp))
    -> logits (B,1,*sp)``, ``*sp`` = (H, W) for ``dim=2`` or (D, H, W) for ``dim=3``.

    Args:
        encoder_blocks: widths of the encoder CrossBlocks, each an int or a
            ``(cross_features, conv_features)`` pair; one max-pool (x2) between consecutive blocks.
        decoder_blocks: widths of the decoder blocks; default ``encoder_blocks[-2::-1]``; must
            have ``len(encoder_blocks) - 1`` entries.
        dim: 2 (Conv2d, MaxPool2d, bilinear) or 3 (Conv3d, MaxPool3d, trilinear).
        in_channels: image channels C (release: 1). Support entries are image ‖ label, i.e.
            C + 1 channels, image first.
        cross_nonlinearity: ``None`` (release) or ``"LeakyReLU"`` after every CrossConv (paper).

    Spatial sizes must be divisible by ``2 ** (len(encoder_blocks) - 1)``; S >= 1 is free at
    run time; the output is invariant to the order of the support set. Memory/compute per
    layer: ``O(S)`` feature maps (see module docstring). Inputs: images in [0, 1], labels in
    {0, 1} (soft labels work too).
    """

    def __init__(
        self,
        encoder_blocks: Sequence[IntOrPair] = (64, 64, 64, 64),
        decoder_blocks: Optional[Sequence[IntOrPair]] = None,
        dim: int = 2,
        *,
        in_channels: int = 1,
        cross_nonlinearity: Optional[str] = None,
    ):
        super().__init__()
        self.dim = _check_dim(dim)
        if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels <= 0:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        enc = _widths(encoder_blocks, "encoder_blocks")
        if not enc:
            raise ValueError("encoder_blocks must hold at least one block")
        dec = enc[-2::-1] if decoder_blocks is None else _widths(decoder_blocks, "decoder_blocks")
        if len(dec) != len(enc) - 1:
            raise ValueError(
                f"decoder_blocks needs len(encoder_blocks) - 1 = {len(enc) - 1} entries, got {len(dec)}"
            )
        self.encoder_blocks = enc
        self.decoder_blocks = dec
        self.in_channels = in_channels
        self.size_multiple = 2 ** (len(enc) - 1)

        self.downsample = _POOL[dim](2, 2)
        self.upsample = nn.Upsample(scale_factor=2, mode=_UPSAMPLE_MODE[dim], align_corners=True)
        self.enc_blocks = nn.ModuleList()
        self.dec_blocks = nn.ModuleList()

        in_ch: IntOrPair = (in_channels, in_channels + 1)
        skips = []
        for cross_f, conv_f in enc:
            self.enc_blocks.append(CrossBlock(in_ch, cross_f, conv_f, dim=dim, cross_nonlinearity=cross_nonlinearity))
            in_ch = conv_f
            skips.append(conv_f)
        for (cross_f, conv_f), skip in zip(dec, skips[-2::-1]):
            self.dec_blocks.append(
                CrossBlock(in_ch + skip, cross_f, conv_f, dim=dim, cross_nonlinearity=cross_nonlinearity)
            )
            in_ch = conv_f
        self.out_conv = ConvOp(in_ch, 1, kernel_size=1, dim=dim, nonlinearity=None)

    def _validate(self, target_image: torch.Tensor, support_images: torch.Tensor, support_labels: torch.Tensor):
        d, c = self.dim, self.in_channels
        if target_image.ndim != 2 + d or support_images.ndim != 3 + d or support_labels.ndim != 3 + d:
            raise ValueError(
                f"UniverSeg(dim={d}) expects target_image (B,C,*sp), support_images (B,S,C,*sp), "
                f"support_labels (B,S,1,*sp) with {d} spatial axes; got {tuple(target_image.shape)}, "
                f"{tuple(support_images.shape)}, {tuple(support_labels.shape)}"
            )
        B, sp = target_image.shape[0], tuple(target_image.shape[2:])
        if target_image.shape[1] != c or support_images.shape[2] != c:
            raise ValueError(
                f"expected {c} image channel(s), got target {target_image.shape[1]} and support {support_images.shape[2]}"
            )
        if support_labels.shape[2] != 1:
            raise ValueError(f"support_labels must have 1 channel, got {support_labels.shape[2]}")
        if support_images.shape[1] < 1 or support_images.shape[:2] != support_labels.shape[:2]:
            raise ValueError(
                f"support_images {tuple(support_images.shape)} and support_labels {tuple(support_labels.shape)} "
                "need the same B and S >= 1"
            )
        if support_images.shape[0] != B or tuple(support_images.shape[3:]) != sp or tuple(support_labels.shape[3:]) != sp:
            raise ValueError(
                f"batch/spatial sizes differ: target {tuple(target_image.shape)}, support_images "
                f"{tuple(support_images.shape)}, support_labels {tuple(support_labels.shape)}"
            )
        if any(s % self.size_multiple for s in sp):
            raise ValueError(
                f"spatial size {sp} must be divisible by 2**(len(encoder_blocks)-1) = {self.size_multiple}"
            )

    def forward(
        self, target_image: torch.Tensor, support_images: torch.Tensor, support_labels: torch.Tensor
    ) -> torch.Tensor:
        """target_image (B,C,*sp), support_images (B,S,C,*sp), support_labels (B,S,1,*sp) -> logits (B,1,*sp)."""
        self._validate(target_image, support_images, support_labels)
        target = target_image.unsqueeze(1)  # (B, 1, C, *sp)
        support = torch.cat([support_images, support_labels.to(support_images.dtype)], dim=2)  # (B, S, C+1, *sp)

        n_enc, n_dec = len(self.enc_blocks), len(self.dec_blocks)
        skips = []
        for i, block in enumerate(self.enc_blocks):
            last = i == n_enc - 1
            target, support = block(target, support, compute_support=not (last and n_dec == 0))
            if last:
                break
            skips.append((target, support))
            target = vmap(self.downsample, target)
            support = vmap(self.downsample, support)

        for j, block in enumerate(self.dec_blocks):
            target_skip, support_skip = skips.pop()
            target = torch.cat([vmap(self.upsample, target), target_skip], dim=2)
            support = torch.cat([vmap(self.upsample, support), support_skip], dim=2)
            target, support = block(target, support, compute_support=j < n_dec - 1)

        return self.out_conv(target.squeeze(1))  # (B, 1, *sp)

