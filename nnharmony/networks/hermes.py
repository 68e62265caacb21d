"""Hermes (Gao et al., CVPR 2024): context-prior learning on top of an nnU-Net backbone.

The method, as implemented here (``/work/shared/METHODS.md`` section B):

* every fusion level owns an independent :class:`PriorPool`: task-prior tokens (one per global task plus a
  shared *null* token selected by task id ``-1``) and modality-prior tokens (``L`` tokens per modality plus an
  *unknown modality* entry selected by modality id ``-1``);
* :class:`PriorFusion` selects each sample's priors ``(B, T+L, C)`` and runs :class:`PriorAttentionBlock` s:
  priors read from the image tokens, image tokens read from the updated priors (pre-norm, residual, MLP);
* the task posteriors of all levels give one prototype per task (:class:`PosteriorPrototypeHead`); a task's
  logit map is the dot product of its prototype with the decoder features (a dynamic 1x1 conv); masks are
  independent sigmoids, one per requested task;
* the modality posteriors of all levels feed an auxiliary :class:`ModalityClassifier`.

:class:`HermesUNet` wraps a ``dynamic_network_architectures`` ``PlainConvUNet`` / ``ResidualEncoderUNet``
(/ ``ResidualUNet``) built the usual nnU-Net way and inserts the fusion after the encoder stages at 1/4, 1/8,
1/16 and after the decoder stages at 1/8, 1/4 (see :func:`hermes_fusion_stages`).

Conventions
-----------
``task_ids``: long ``(B, T)``, global task ids, padded with ``-1`` (mixed-dataset batches: each row holds
its dataset's tasks). Output channel ``j`` of the segmentation is task ``task_ids[:, j]``; padded columns give
meaningless logits that the loss ignores. ``modality_id``: long ``(B,)``, ``-1`` = unknown modality.

Mapping to the official configuration (``tn: 72``, ``mn: 6``): the official pools are ``(tn+1, C)`` and
``(mn, 10, C)``. Here the pools are ``(num_tasks+1, C)`` and ``(num_modalities+1, L, C)``, so
``num_tasks=72, num_modalities=5`` reproduces them exactly (0.145 M prior parameters with C = 128, 256, 320,
256, 128; the official code has 71 real tasks, so its row 71 is never selected; its 5 real modalities CT,
PET, T1, T2, cine-MRI take rows 0..4 and row 5 is the unknown-modality entry). In nnharmony
``num_tasks = len(spec.tasks)`` and ``num_modalities = len(spec.modalities)``.

Deviations from the official code (all documented where they happen):

1. Padded task slots (id ``-1``) are masked out as attention *keys* of the image tokens
   (``mask_padded_tasks=True``), so a sample's prediction does not depend on how wide the batch was padded.
   The official code lets the image tokens attend to every copy of the null token (``False`` restores it).
2. ``heads = max(1, C // 32)`` so that tiny test backbones (C < 32) work; identical for C >= 32.
3. The prototype head projects the decoder features of each scale to ``proto_dim`` with a bias-free linear
   map (computed as prototype @ W, which is the same as a 1x1 conv on the features but never materialises
   the projected map). The official Hermes-R has decoder width 32 = proto_dim and no projection.
4. The modality classifier predicts ``num_modalities`` classes: the unknown entry is not a class (the official
   code predicts ``mn`` classes including the never-targeted unknown row).
5. Skips: as in the official code, the *fused* encoder features are the skips of the decoder.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = [
    "PriorPool",
    "PriorAttentionBlock",
    "PriorFusion",
    "PosteriorPrototypeHead",
    "ModalityClassifier",
    "HermesUNet",
    "HermesOutput",
    "hermes_fusion_stages",
    "count_prior_parameters",
    "task_ids_from_mask",
    "gather_tasks",
    "OFFICIAL_PRIOR_PARAMETERS",
]

#: prior-pool parameter count of the official Hermes-R configuration: 5 levels, C = 128, 256, 320, 256, 128,
#: task prior (73, C), modality prior (6, 10, C): (73 + 60) * 1088 = 144,704 ("0.145 M").
OFFICIAL_PRIOR_PARAMETERS = (73 + 6 * 10) * (128 + 256 + 320 + 256 + 128)


def _xavier(*shape: int) -> torch.Tensor:
    return nn.init.xavier_uniform_(torch.empty(*shape))


def _check_condition(task_ids: torch.Tensor, modality_id: torch.Tensor, batch: Optional[int] = None) -> None:
    if task_ids.dim() != 2 or task_ids.dtype != torch.long:
        raise ValueError(f"task_ids must be a long tensor (B, T), got {tuple(task_ids.shape)} {task_ids.dtype}")
    if modality_id.dim() != 1 or modality_id.dtype != torch.long:
        raise ValueError(f"modality_id must be a long tensor (B,), got {tuple(modality_id.shape)} {modality_id.dtype}")
    if modality_id.shape[0] != task_ids.shape[0]:
        raise ValueError(f"task_ids batch {task_ids.shape[0]} != modality_id batch {modality_id.shape[0]}")
    if batch is not None and task_ids.shape[0] != batch:
        raise ValueError(f"condition batch {task_ids.shape[0]} != input batch {batch}")


class _Mlp(nn.Sequential):
    """Linear(in, hidden) - GELU - Linear(hidden, out). ``(..., in) -> (..., out)``."""

    def __init__(self, in_dim: int, hidden_dim: Optional[int] = None, out_dim: Optional[int] = None):
        hidden_dim = hidden_dim or in_dim
        out_dim = out_dim or in_dim
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))


# ----------------------------------------------------------------------------------------------------------
# prior pool
# ----------------------------------------------------------------------------------------------------------
class PriorPool(nn.Module):
    """Learnable task and modality prior tokens of one fusion level.

    Parameters: ``task_prior`` ``(num_tasks + 1, C)``, last row = null token (task id ``-1``);
    ``modality_prior`` ``(num_modalities + 1, L, C)``, last entry = unknown modality (modality id ``-1``).
    Both xavier-uniform initialised.

    ``select(task_ids (B, T), modality_id (B,)) -> (B, T + L, C)``: task tokens first, then modality tokens.
    """

    def __init__(self, num_tasks: int, num_modalities: int, channels: int, tokens_per_modality: int = 10):
        super().__init__()
        if num_tasks < 1 or num_modalities < 0 or channels < 1 or tokens_per_modality < 1:
            raise ValueError(
                f"invalid PriorPool sizes: num_tasks={num_tasks}, num_modalities={num_modalities}, "
                f"channels={channels}, tokens_per_modality={tokens_per_modality}"
            )
        self.channels = channels
        self.tokens_per_modality = tokens_per_modality
        self.task_prior = nn.Parameter(_xavier(num_tasks + 1, channels))
        self.modality_prior = nn.Parameter(_xavier(num_modalities + 1, tokens_per_modality, channels))

    @property
    def num_tasks(self) -> int:
        return self.task_prior.shape[0] - 1

    @property
    def num_modalities(self) -> int:
        return self.modality_prior.shape[0] - 1

    def select(self, task_ids: torch.Tensor, modality_id: torch.Tensor) -> torch.Tensor:
        """``task_ids`` long (B, T) padded -1, ``modality_id`` long (B,) (-1 unknown) -> priors (B, T+L, C)."""
        _check_condition(task_ids, modality_id)
        t_rows = torch.where(task_ids < 0, torch.full_like(task_ids, self.num_tasks), task_ids)
        m_rows = torch.where(modality_id < 0, torch.full_like(modality_id, self.num_modalities), modality_id)
        task_tokens = self.task_prior[t_rows]  # (B, T, C)
        modality_tokens = self.modality_prior[m_rows]  # (B, L, C)
        return torch.cat([task_tokens, modality_tokens], dim=1)

    @torch.no_grad()
    def extend(self, num_new_tasks: int = 0, num_new_modalities: int = 0) -> None:
        """Add task / modality rows; existing rows (null and unknown included) stay bit-identical and the
        null / unknown rows stay last, so every existing id keeps its token. New rows are xavier initialised
        (with the fan of the enlarged tensor). Replaces the Parameters: rebuild the optimizer afterwards."""
        if num_new_tasks < 0 or num_new_modalities < 0:
            raise ValueError("extend() only adds rows")
        if num_new_tasks:
            old = self.task_prior.data
            new = _xavier(old.shape[0] + num_new_tasks, old.shape[1]).to(old)
            new[: old.shape[0] - 1] = old[:-1]
            new[-1] = old[-1]
            self.task_prior = nn.Parameter(new, requires_grad=self.task_prior.requires_grad)
        if num_new_modalities:
            old = self.modality_prior.data
            new = _xavier(old.shape[0] + num_new_modalities, *old.shape[1:]).to(old)
            new[: old.shape[0] - 1] = old[:-1]
            new[-1] = old[-1]
            self.modality_prior = nn.Parameter(new, requires_grad=self.modality_prior.requires_grad)

    def extra_repr(self) -> str:
        return (f"num_tasks={self.num_tasks} (+null), num_modalities={self.num_modalities} (+unknown), "
                f"tokens_per_modality={self.tokens_per_modality}, channels={self.channels}")


# ----------------------------------------------------------------------------------------------------------
# bidirectional prior attention
# ----------------------------------------------------------------------------------------------------------
class _CrossAttention(nn.Module):
    """Queries ``(B, Nq, C)`` attend to ``(B, Nk, C)``: q = Linear(C, h*d, no bias), k/v = Linear(C, 2*h*d,
    no bias), softmax(q k^T / sqrt(d)) v, out = Linear(h*d, C). Uses ``F.scaled_dot_product_attention``; the
    score matrix is Nq x Nk with one side the (few) prior tokens, so memory is linear in the voxel count."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, q_in: torch.Tensor, kv_in: torch.Tensor, key_mask: Optional[torch.Tensor] = None):
        q = rearrange(self.to_q(q_in), "b n (h d) -> b h n d", h=self.heads)
        k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in self.to_kv(kv_in).chunk(2, dim=-1))
        mask = None if key_mask is None else key_mask[:, None, None, :]  # True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class PriorAttentionBlock(nn.Module):
    """One bidirectional prior/feature update (METHODS B.3)::

        p = p + CrossAttn(q=LN(p), kv=LN(x))      # priors aggregate from the image tokens
        p = p + MLP(LN(p))                        # C -> mlp_ratio*C -> C, GELU
        x = x + CrossAttn(q=LN(x), kv=LN(p))      # image tokens read from the updated priors
        x = x + MLP(LN(x))

    Attention LayerNorms use eps 1e-5 (official ``DualPreNorm``), MLP LayerNorms eps 1e-4 (official
    ``PreNorm``). ``heads`` defaults to ``max(1, C // 32)``, ``dim_head`` 32.

    ``forward(x, priors, prior_mask=None) -> (x, priors)``: ``x`` image tokens ``(B, N, C)`` or a feature map
    ``(B, C, H, W)`` / ``(B, C, D, H, W)`` (returned in the same layout); ``priors`` ``(B, P, C)``;
    ``prior_mask`` bool ``(B, P)``: False = the prior is not a key for the image tokens (padding).
    """

    def __init__(self, channels: int, heads: Optional[int] = None, dim_head: int = 32, mlp_ratio: int = 4):
        super().__init__()
        heads = max(1, channels // 32) if heads is None else heads
        if heads < 1 or dim_head < 1 or mlp_ratio < 1:
            raise ValueError(f"invalid attention sizes heads={heads} dim_head={dim_head} mlp_ratio={mlp_ratio}")
        self.channels, self.heads, self.dim_head = channels, heads, dim_head
        # priors <- image
        self.prior_attn_norm_q = nn.LayerNorm(channels)
        self.prior_attn_norm_kv = nn.LayerNorm(channels)
        self.prior_attn = _CrossAttention(channels, heads, dim_head)
        self.prior_mlp_norm = nn.LayerNorm(channels, eps=1e-4)
        self.prior_mlp = _Mlp(channels, mlp_ratio * channels, channels)
        # image <- priors
        self.feat_attn_norm_q = nn.LayerNorm(channels)
        self.feat_attn_norm_kv = nn.LayerNorm(channels)
        self.feat_attn = _CrossAttention(channels, heads, dim_head)
        self.feat_mlp_norm = nn.LayerNorm(channels, eps=1e-4)
        self.feat_mlp = _Mlp(channels, mlp_ratio * channels, channels)

    def forward(self, x: torch.Tensor, priors: torch.Tensor, prior_mask: Optional[torch.Tensor] = None):
        spatial = None
        if x.dim() in (4, 5):
            spatial = x.shape[2:]
            x = rearrange(x, "b c ... -> b (...) c")
        elif x.dim() != 3:
            raise ValueError(f"x must be (B, N, C) tokens or a 2D/3D feature map, got {tuple(x.shape)}")
        if x.shape[-1] != self.channels or priors.shape[-1] != self.channels:
            raise ValueError(f"channel mismatch: block {self.channels}, x {x.shape[-1]}, priors {priors.shape[-1]}")

        priors = priors + self.prior_attn(self.prior_attn_norm_q(priors), self.prior_attn_norm_kv(x))
        priors = priors + self.prior_mlp(self.prior_mlp_norm(priors))
        x = x + self.feat_attn(self.feat_attn_norm_q(x), self.feat_attn_norm_kv(priors), key_mask=prior_mask)
        x = x + self.feat_mlp(self.feat_mlp_norm(x))

        if spatial is not None:
            x = x.transpose(1, 2).reshape(x.shape[0], self.channels, *spatial)
        return x, priors


class PriorFusion(nn.Module):
    """A :class:`PriorPool` plus ``n_blocks`` :class:`PriorAttentionBlock` s (one fusion level).

    ``forward(x (B, C, *sp), task_ids (B, T), modality_id (B,)) -> (x' (B, C, *sp), priors (B, T+L, C))``;
    ``priors[:, :T]`` are the task posteriors, ``priors[:, T:]`` the modality posteriors.
    With ``mask_padded_tasks`` padded task slots (id -1) are not keys for the image tokens.
    ``task_context=False`` (ablation "without task priors"): the task tokens take no part in the fusion and are
    returned unchanged, so the prototypes are static per task (a learned linear head, as the baseline's).
    """

    def __init__(self, channels: int, n_blocks: int, num_tasks: int, num_modalities: int,
                 tokens_per_modality: int = 10, heads: Optional[int] = None, dim_head: int = 32,
                 mlp_ratio: int = 4, mask_padded_tasks: bool = True, task_context: bool = True):
        super().__init__()
        if n_blocks < 1:
            raise ValueError(f"n_blocks must be >= 1, got {n_blocks}")
        self.channels = channels
        self.mask_padded_tasks = mask_padded_tasks
        self.task_context = task_context
        self.pool = PriorPool(num_tasks, num_modalities, channels, tokens_per_modality)
        self.blocks = nn.ModuleList(
            PriorAttentionBlock(channels, heads, dim_head, mlp_ratio) for _ in range(n_blocks)
        )

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor, modality_id: torch.Tensor,
                has_padding: Optional[bool] = None):
        """``has_padding``: whether any task id is -1, if the caller knows it (saves a device sync per level)."""
        if x.dim() not in (4, 5) or x.shape[1] != self.channels:
            raise ValueError(f"expected (B, {self.channels}, *sp) with 2 or 3 spatial dims, got {tuple(x.shape)}")
        priors = self.pool.select(task_ids, modality_id).to(x.dtype)
        if not self.task_context:
            T = task_ids.shape[1]
            x, fused = self._fuse(x, priors[:, T:], None)
            return x, torch.cat([priors[:, :T], fused], dim=1)
        mask = None
        if has_padding is None:
            has_padding = bool((task_ids < 0).any())
        if self.mask_padded_tasks and has_padding:
            L = priors.shape[1] - task_ids.shape[1]
            mask = torch.cat([task_ids >= 0, task_ids.new_ones(task_ids.shape[0], L, dtype=torch.bool)], dim=1)
        return self._fuse(x, priors, mask)

    def _fuse(self, x: torch.Tensor, priors: torch.Tensor, mask: Optional[torch.Tensor]):
        spatial = x.shape[2:]
        tokens = rearrange(x, "b c ... -> b (...) c")
        for block in self.blocks:
            tokens, priors = block(tokens, priors, mask)
        x = tokens.transpose(1, 2).reshape(x.shape[0], self.channels, *spatial)
        return x, priors


# ----------------------------------------------------------------------------------------------------------
# heads
# ----------------------------------------------------------------------------------------------------------
class PosteriorPrototypeHead(nn.Module):
    """Task posteriors of all levels -> one prototype per task -> logits against decoder features.

    ``prototypes(posteriors: list of (B, T, C_l)) -> (B, T, proto_dim)``:
    concat over levels (B, T, sum C_l) -> LayerNorm -> MLP(sum -> sum -> proto) -> MLP(proto -> proto -> proto)
    (xavier weights, zero biases as in the official head).

    ``forward(posteriors, features)``: ``features`` one tensor ``(B, C_s, *sp)`` (scale 0) or a list with one
    tensor per scale, ordered like ``feat_channels`` (highest resolution first) -> logits ``(B, T, *sp)``
    (a list for a list). Per scale a bias-free projection ``C_s -> proto_dim`` is applied; it is folded into
    the prototypes (``W_s^T p``), which equals a 1x1 conv on the features without materialising the
    projected map.
    """

    def __init__(self, level_channels: Sequence[int], feat_channels: Union[int, Sequence[int]], proto_dim: int = 32):
        super().__init__()
        level_channels = [int(c) for c in level_channels]
        if not level_channels or min(level_channels) < 1 or proto_dim < 1:
            raise ValueError(f"invalid head sizes level_channels={level_channels} proto_dim={proto_dim}")
        feat_channels = [int(feat_channels)] if isinstance(feat_channels, int) else [int(c) for c in feat_channels]
        self.level_channels, self.feat_channels, self.proto_dim = level_channels, feat_channels, proto_dim
        total = sum(level_channels)
        self.norm = nn.LayerNorm(total)
        self.mlp = nn.Sequential(_Mlp(total, total, proto_dim), _Mlp(proto_dim, proto_dim, proto_dim))
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.projections = nn.ModuleList(nn.Linear(c, proto_dim, bias=False) for c in feat_channels)

    def prototypes(self, posteriors: Sequence[torch.Tensor]) -> torch.Tensor:
        if [p.shape[-1] for p in posteriors] != self.level_channels:
            raise ValueError(f"posterior channels {[p.shape[-1] for p in posteriors]} != {self.level_channels}")
        return self.mlp(self.norm(torch.cat(list(posteriors), dim=-1)))

    def logits(self, prototypes: torch.Tensor, features: torch.Tensor, scale: int = 0) -> torch.Tensor:
        """prototypes (B, T, P), features (B, C_scale, *sp) -> (B, T, *sp)."""
        if features.shape[1] != self.feat_channels[scale]:
            raise ValueError(f"scale {scale}: expected {self.feat_channels[scale]} channels, got {features.shape[1]}")
        weights = prototypes @ self.projections[scale].weight.to(prototypes.dtype)  # (B, T, C_scale)
        return torch.einsum("btc,bc...->bt...", weights.to(features.dtype), features)

    def forward(self, posteriors: Sequence[torch.Tensor], features: Union[torch.Tensor, Sequence[torch.Tensor]]):
        protos = self.prototypes(posteriors)
        if isinstance(features, torch.Tensor):
            return self.logits(protos, features, 0)
        if len(features) > len(self.feat_channels):
            raise ValueError(f"{len(features)} feature scales given, head has {len(self.feat_channels)}")
        return [self.logits(protos, f, s) for s, f in enumerate(features)]


class ModalityClassifier(nn.Module):
    """Modality posteriors of all levels ``list of (B, L, C_l)`` -> concat (B, L, sum C_l) -> LayerNorm ->
    mean over the L tokens -> MLP(sum -> sum -> num_modalities) -> logits ``(B, num_modalities)``.

    The unknown-modality entry of the pools is not a class: samples with modality id -1 are ignored by the
    loss (``ignore_index=-1``), so only the real modalities get logits."""

    def __init__(self, level_channels: Sequence[int], num_modalities: int):
        super().__init__()
        if num_modalities < 1:
            raise ValueError("ModalityClassifier needs at least one modality")
        self.level_channels = [int(c) for c in level_channels]
        total = sum(self.level_channels)
        self.norm = nn.LayerNorm(total)
        self.mlp = _Mlp(total, total, num_modalities)

    @property
    def num_modalities(self) -> int:
        return self.mlp[-1].out_features

    def forward(self, posteriors: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.mlp(self.norm(torch.cat(list(posteriors), dim=-1)).mean(dim=1))

    @torch.no_grad()
    def extend(self, num_new_modalities: int) -> None:
        """Add output classes; the logits of existing classes stay bit-identical."""
        if num_new_modalities <= 0:
            return
        old = self.mlp[-1]
        new = nn.Linear(old.in_features, old.out_features + num_new_modalities).to(old.weight)
        new.weight[: old.out_features] = old.weight
        new.bias[: old.out_features] = old.bias
        self.mlp[-1] = new


# ----------------------------------------------------------------------------------------------------------
# stage mapping
# ----------------------------------------------------------------------------------------------------------
def hermes_fusion_stages(
    strides: Sequence[Union[int, Sequence[int]]],
    encoder_blocks: Sequence[int] = (2, 2, 4),
    decoder_blocks: Sequence[int] = (2, 2),
) -> Dict[str, Dict[int, int]]:
    """Map the paper's fusion levels onto an nnU-Net encoder given its per-stage ``strides``.

    Encoder levels 1/4, 1/8, 1/16 (``encoder_blocks`` blocks each): the first stage whose *largest*
    cumulative stride reaches 4, 8, 16 (anisotropic strides: the in-plane axes decide). Levels the backbone
    does not reach are dropped; two levels landing on the same stage keep the first.
    Decoder levels 1/8, 1/4 (``decoder_blocks``): the decoder stage whose output has the resolution of the
    encoder stage chosen for that level (decoder stage ``s`` outputs encoder stage ``n - 2 - s``'s
    resolution); dropped if that encoder stage is the bottleneck (no decoder stage there).

    Returns ``{"encoder": {stage: n_blocks}, "decoder": {stage: n_blocks}}``.
    """
    n = len(strides)
    cum, cum_max = [1] * 3, []
    for s in strides:
        s = [s] * 3 if isinstance(s, int) else list(s)
        cum = [a * b for a, b in zip(cum, s + [1] * (3 - len(s)))]
        cum_max.append(max(cum))

    def first_stage(factor: int) -> Optional[int]:
        return next((i for i, c in enumerate(cum_max) if c >= factor), None)

    enc: Dict[int, int] = {}
    for factor, nb in zip((4, 8, 16), encoder_blocks):
        st = first_stage(factor)
        if st is not None and st not in enc:
            enc[st] = int(nb)
    dec: Dict[int, int] = {}
    for factor, nb in zip((8, 4), decoder_blocks):
        st = first_stage(factor)
        if st is not None and st <= n - 2 and (n - 2 - st) not in dec:
            dec[n - 2 - st] = int(nb)
    return {"encoder": enc, "decoder": dict(sorted(dec.items()))}


# ----------------------------------------------------------------------------------------------------------
# the network
# ----------------------------------------------------------------------------------------------------------
class HermesOutput(NamedTuple):
    seg: Union[torch.Tensor, List[torch.Tensor]]
    modality_logits: torch.Tensor


class HermesUNet(nn.Module):
    """Hermes on an nnU-Net ``PlainConvUNet`` / ``ResidualEncoderUNet`` / ``ResidualUNet`` backbone.

    ``forward(x (B, C_in, *sp), *, task_ids=None, modality_id=None, cond=None)`` -> segmentation logits
    ``(B, T, *sp)``, or with deep supervision a list over the decoder stages, highest resolution first
    (nnU-Net's order and scales). The modality logits ``(B, num_modalities)`` are stored in
    ``self.last_modality_logits`` (nnU-Net's loss/predictor see a plain tensor / list). Conditioning comes
    from the keywords, from ``cond={"task_ids": ..., "modality_id": ...}`` or, when absent (nnU-Net's
    predictor calls ``network(x)``), from :meth:`set_inference_condition`.

    The backbone's ``encoder`` and ``decoder`` become this module's ``encoder`` / ``decoder`` (so state-dict
    keys match nnU-Net's and ``network.decoder.deep_supervision = flag`` works); the backbone's ``seg_layers``
    are removed (replaced by the prototype head; unused parameters would break DDP).

    ``fusion_stages``: ``"auto"`` (see :func:`hermes_fusion_stages`, blocks from ``blocks_per_level``
    ``{"encoder": (1/4, 1/8, 1/16), "decoder": (1/8, 1/4)}``) or ``{"encoder": {stage: n_blocks},
    "decoder": {stage: n_blocks}}``. ``deep_supervision=None`` keeps the backbone's setting.
    ``task_context=False``: the ablation without task-prior fusion (see :class:`PriorFusion`).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_tasks: int,
        num_modalities: int,
        fusion_stages: Union[str, Mapping[str, Mapping[int, int]]] = "auto",
        blocks_per_level: Optional[Mapping[str, Sequence[int]]] = None,
        tokens_per_modality: int = 10,
        proto_dim: int = 32,
        deep_supervision: Optional[bool] = None,
        heads: Optional[int] = None,
        dim_head: int = 32,
        mlp_ratio: int = 4,
        mask_padded_tasks: bool = True,
        task_context: bool = True,
    ):
        super().__init__()
        for attr in ("encoder", "decoder"):
            if not hasattr(backbone, attr):
                raise TypeError(f"backbone {type(backbone).__name__} has no .{attr}")
        encoder, decoder = backbone.encoder, backbone.decoder
        for attr in ("stages", "output_channels", "strides"):
            if not hasattr(encoder, attr):
                raise TypeError(f"backbone encoder has no .{attr}")
        for attr in ("stages", "transpconvs"):
            if not hasattr(decoder, attr):
                raise TypeError(f"backbone decoder has no .{attr}")
        n_stages = len(encoder.stages)
        if len(decoder.stages) != n_stages - 1:
            raise ValueError("decoder must have one stage fewer than the encoder")

        decoder.seg_layers = nn.ModuleList()  # replaced by the prototype head
        if deep_supervision is not None:
            decoder.deep_supervision = bool(deep_supervision)
        self.encoder = encoder
        self.decoder = decoder
        self.num_tasks, self.num_modalities = int(num_tasks), int(num_modalities)

        if fusion_stages == "auto":
            bpl = {"encoder": (2, 2, 4), "decoder": (2, 2)}
            bpl.update(blocks_per_level or {})
            fusion_stages = hermes_fusion_stages(encoder.strides, bpl["encoder"], bpl["decoder"])
        enc_st = {int(k): int(v) for k, v in fusion_stages.get("encoder", {}).items()}
        dec_st = {int(k): int(v) for k, v in fusion_stages.get("decoder", {}).items()}
        if not enc_st and not dec_st:
            raise ValueError("Hermes needs at least one fusion stage")
        if any(not 0 <= s < n_stages for s in enc_st) or any(not 0 <= s < n_stages - 1 for s in dec_st):
            raise ValueError(f"fusion stages {fusion_stages} out of range for {n_stages} encoder stages")
        self.fusion_stages = {"encoder": dict(sorted(enc_st.items())), "decoder": dict(sorted(dec_st.items()))}

        ch = list(encoder.output_channels)
        dec_ch = [ch[n_stages - 2 - s] for s in range(n_stages - 1)]  # decoder stage s output channels

        def fusion(c, nb):
            return PriorFusion(c, nb, num_tasks, num_modalities, tokens_per_modality, heads, dim_head, mlp_ratio,
                               mask_padded_tasks, task_context)

        enc_f, dec_f = self.fusion_stages["encoder"], self.fusion_stages["decoder"]
        self.encoder_fusion = nn.ModuleDict({str(s): fusion(ch[s], nb) for s, nb in enc_f.items()})
        self.decoder_fusion = nn.ModuleDict({str(s): fusion(dec_ch[s], nb) for s, nb in dec_f.items()})
        # posterior order = execution order: encoder levels (1/4, 1/8, 1/16), then decoder levels (1/8, 1/4)
        level_channels = [ch[s] for s in enc_f] + [dec_ch[s] for s in dec_f]
        self.level_channels = level_channels
        # prototype head: one projection per decoder stage, highest resolution first (DS order)
        self.head = PosteriorPrototypeHead(level_channels, dec_ch[::-1], proto_dim)
        self.modality_classifier = ModalityClassifier(level_channels, num_modalities)

        self.last_modality_logits: Optional[torch.Tensor] = None
        self._inference_task_ids: Optional[torch.Tensor] = None
        self._inference_modality_id: Optional[torch.Tensor] = None

    # -- conditioning -------------------------------------------------------------------------------------
    def set_inference_condition(self, task_ids, modality_id) -> None:
        """Bind the condition used when ``forward`` gets none (nnU-Net's predictor calls ``network(x)``).
        ``task_ids``: (T,) or (1|B, T) ints; ``modality_id``: int, (1,) or (B,). A single row is broadcast over
        the batch. ``set_inference_condition(None, None)`` clears it."""
        if task_ids is None:
            self._inference_task_ids = self._inference_modality_id = None
            return
        t = torch.as_tensor(task_ids, dtype=torch.long)
        t = t[None] if t.dim() == 1 else t
        m = torch.as_tensor(modality_id, dtype=torch.long).reshape(-1)
        if m.numel() == 1 and t.shape[0] > 1:
            m = m.expand(t.shape[0]).clone()
        _check_condition(t, m)
        self._validate_ids(t, m)
        self._inference_task_ids, self._inference_modality_id = t, m

    def _validate_ids(self, task_ids: torch.Tensor, modality_id: torch.Tensor) -> None:
        if task_ids.numel() and (int(task_ids.min()) < -1 or int(task_ids.max()) >= self.num_tasks):
            raise ValueError(f"task ids must be in [-1, {self.num_tasks - 1}]")
        if modality_id.numel() and (int(modality_id.min()) < -1 or int(modality_id.max()) >= self.num_modalities):
            raise ValueError(f"modality ids must be in [-1, {self.num_modalities - 1}]")

    def _resolve_condition(self, x, task_ids, modality_id, cond, validate: bool = True):
        if cond is not None:
            task_ids = cond.get("task_ids", task_ids) if task_ids is None else task_ids
            modality_id = cond.get("modality_id", modality_id) if modality_id is None else modality_id
        B = x.shape[0]
        if task_ids is None:
            if self._inference_task_ids is None:
                raise RuntimeError("HermesUNet needs task_ids/modality_id: pass them or set_inference_condition()")
            task_ids, modality_id = self._inference_task_ids, self._inference_modality_id
            if task_ids.shape[0] == 1 and B > 1:
                task_ids, modality_id = task_ids.expand(B, -1), modality_id.expand(B)
        elif modality_id is None:
            modality_id = torch.full((B,), -1, dtype=torch.long, device=task_ids.device)
        _check_condition(task_ids, modality_id, B)
        if validate:
            self._validate_ids(task_ids, modality_id)
        return task_ids, modality_id

    # -- forward ------------------------------------------------------------------------------------------
    def forward_with_modality(self, x, *, task_ids=None, modality_id=None, cond=None) -> HermesOutput:
        """Ids may be given on the CPU (as the trainer does): they are checked there and moved to ``x``'s device
        without blocking, so a training step waits for the GPU nowhere in the fusion."""
        # under torch.compile nothing may read the ids' values (a graph break per read): the ids are not
        # range-checked (the trainer builds them) and the padded-task mask is always built (all True: no effect)
        compiling = torch.compiler.is_compiling()
        task_ids, modality_id = self._resolve_condition(x, task_ids, modality_id, cond, validate=not compiling)
        has_padding = True if compiling else bool((task_ids < 0).any())
        task_ids = task_ids.to(x.device, non_blocking=True)
        modality_id = modality_id.to(x.device, non_blocking=True)
        T = task_ids.shape[1]
        posteriors: List[torch.Tensor] = []

        if getattr(self.encoder, "stem", None) is not None:
            x = self.encoder.stem(x)
        skips = []
        for s, stage in enumerate(self.encoder.stages):
            x = stage(x)
            if str(s) in self.encoder_fusion:
                x, p = self.encoder_fusion[str(s)](x, task_ids, modality_id, has_padding)
                posteriors.append(p)
            skips.append(x)

        lres, feats = skips[-1], []
        for s, stage in enumerate(self.decoder.stages):
            y = self.decoder.transpconvs[s](lres)
            y = stage(torch.cat((y, skips[-(s + 2)]), 1))
            if str(s) in self.decoder_fusion:
                y, p = self.decoder_fusion[str(s)](y, task_ids, modality_id, has_padding)
                posteriors.append(p)
            feats.append(y)
            lres = y

        feats = feats[::-1]  # highest resolution first
        protos = self.head.prototypes([p[:, :T] for p in posteriors])
        if self.decoder.deep_supervision:
            seg = [self.head.logits(protos, f, i) for i, f in enumerate(feats)]
        else:
            seg = self.head.logits(protos, feats[0], 0)
        mod = self.modality_classifier([p[:, T:] for p in posteriors])
        return HermesOutput(seg, mod)

    def forward(self, x, *, task_ids=None, modality_id=None, cond=None):
        out = self.forward_with_modality(x, task_ids=task_ids, modality_id=modality_id, cond=cond)
        self.last_modality_logits = out.modality_logits
        return out.seg

    # -- continual learning -------------------------------------------------------------------------------
    def pools(self) -> List[PriorPool]:
        return [m for m in self.modules() if isinstance(m, PriorPool)]

    def extend(self, num_new_tasks: int = 0, num_new_modalities: int = 0) -> None:
        """Add tasks / modalities to every prior pool (and classes to the modality classifier). Outputs for
        existing tasks and modalities are unchanged until the new parameters are trained; rebuild the
        optimizer afterwards (the pool Parameters are replaced)."""
        for pool in self.pools():
            pool.extend(num_new_tasks, num_new_modalities)
        self.modality_classifier.extend(num_new_modalities)
        self.num_tasks += num_new_tasks
        self.num_modalities += num_new_modalities


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def count_prior_parameters(module: nn.Module) -> int:
    """Number of prior-pool parameters (task + modality tokens of every :class:`PriorPool`) in ``module``."""
    return sum(p.numel() for m in module.modules() if isinstance(m, PriorPool) for p in m.parameters())


def task_ids_from_mask(task_mask: torch.Tensor, min_width: int = 1) -> torch.Tensor:
    """Global task mask (B, T_global) bool -> per-sample task ids (B, T) padded with -1, ``T`` = the largest
    number of annotated tasks in the batch (at least ``min_width``), ids in increasing order."""
    if task_mask.dim() != 2:
        raise ValueError("task_mask must be (B, T_global)")
    mask = task_mask.bool()
    width = max(int(mask.sum(1).max()) if mask.numel() else 0, min_width)
    ids = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    # annotated ids first (stable order), padded slots after
    key = torch.where(mask, ids, ids + mask.shape[1])
    order = key.argsort(dim=1)[:, :width]
    out = torch.where(torch.gather(mask, 1, order), order, torch.full_like(order, -1))
    if out.shape[1] < width:
        out = torch.cat([out, out.new_full((out.shape[0], width - out.shape[1]), -1)], dim=1)
    return out


def gather_tasks(x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
    """Select task channels: ``x`` (B, T_global, *sp), ``task_ids`` (B, T) padded -1 -> (B, T, *sp) with zeros
    at padded slots. Turns the loader's global multi-hot target into the network's per-sample task layout;
    the matching loss mask is ``task_ids >= 0``."""
    B, T = task_ids.shape
    idx = task_ids.clamp(min=0).reshape(B, T, *([1] * (x.dim() - 2))).expand(B, T, *x.shape[2:])
    out = torch.gather(x, 1, idx)
    valid = (task_ids >= 0).reshape(B, T, *([1] * (x.dim() - 2)))
    return torch.where(valid, out, torch.zeros((), dtype=out.dtype, device=out.device))
