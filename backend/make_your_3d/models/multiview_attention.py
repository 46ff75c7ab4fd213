"""The two attentions of the multi-view UNet, as small swappable diffusers attention processors.

Batch layout (Wonder3D's): the UNet batch is `[normals(B*V), colours(B*V)]`, each domain ordered
sample by sample with its V views consecutive, so row `d*B*V + b*V + v` is domain d (0 normals,
1 colours), sample b, view v. Classifier-free guidance doubles the *samples* (B -> 2B: unconditional
then conditional), never the domains, so the layout below stays valid for guided batches.

- `MultiViewAttnProcessor` (`attn1`): every view's queries attend to the keys/values of all V views
  of its own (sample, domain) group. Attending to the concatenated keys of V views is exactly a
  self-attention over the V*N tokens of the group, so the batch is reshaped to (B*2, V*N, C) and
  one SDPA call does all groups: no loop over views, no key duplication.
- `JointAttnProcessor` (`attn_joint_mid`, the cross-domain attention): each view attends to itself
  in both domains, i.e. row i of the normal half and row i of the colour half form one group of 2*N
  tokens. Same trick: reshape to (B*V, 2*N, C), one SDPA call.

Both take the projections (`to_q`, `to_k`, `to_v`, `to_out`) of a diffusers `Attention`, so the
parameter names match the published checkpoint and a fused kernel can replace either class without
touching the weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention


def _grouped_self_attention(attn: Attention, tokens: torch.Tensor) -> torch.Tensor:
    """Self-attention of `attn` over each group: (G, T, C) -> (G, T, C_out), one SDPA call."""
    groups, length, _ = tokens.shape
    query = attn.to_q(tokens)
    key = attn.to_k(tokens)
    value = attn.to_v(tokens)
    heads = attn.heads
    head_dim = query.shape[-1] // heads
    query = query.view(groups, length, heads, head_dim).transpose(1, 2)
    key = key.view(groups, length, heads, head_dim).transpose(1, 2)
    value = value.view(groups, length, heads, head_dim).transpose(1, 2)
    if attn.upcast_attention:
        query, key = query.float(), key.float()
        value_dtype = value.dtype
        value = value.float()
    out = F.scaled_dot_product_attention(query, key, value, scale=attn.scale)
    if attn.upcast_attention:
        out = out.to(value_dtype)
    out = out.transpose(1, 2).reshape(groups, length, heads * head_dim)
    out = attn.to_out[0](out)
    return attn.to_out[1](out)


def _as_tokens(hidden_states: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...] | None]:
    """Accept (B, N, C) tokens or (B, C, H, W) maps; return tokens and the map shape to restore."""
    if hidden_states.ndim == 4:
        b, c, h, w = hidden_states.shape
        return hidden_states.view(b, c, h * w).transpose(1, 2), (b, c, h, w)
    return hidden_states, None


def _restore(out: torch.Tensor, shape: tuple[int, ...] | None) -> torch.Tensor:
    if shape is None:
        return out
    b, c, h, w = shape
    return out.transpose(1, 2).reshape(b, c, h, w)


class MultiViewAttnProcessor:
    """`attn1`: self-attention across the `num_views` views of each (sample, domain) group."""

    def __init__(self, num_views: int):
        if num_views < 1:
            raise ValueError(f"num_views must be at least 1, got {num_views}")
        self.num_views = num_views

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("multi-view self-attention takes no encoder states or attention mask")
        tokens, shape = _as_tokens(hidden_states)
        batch, length, channels = tokens.shape
        views = self.num_views
        if batch % views:
            raise ValueError(f"batch {batch} is not a multiple of num_views {views}: expected [normals(B*{views}), colours(B*{views})]")
        grouped = tokens.reshape(batch // views, views * length, channels)
        out = _grouped_self_attention(attn, grouped)
        out = out.reshape(batch, length, out.shape[-1])
        if attn.residual_connection:
            out = out + tokens
        return _restore(out / attn.rescale_output_factor, shape)


class JointAttnProcessor:
    """`attn_joint_mid`: each view attends to its own tokens in both domains (normal and colour)."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("cross-domain attention takes no encoder states or attention mask")
        tokens, shape = _as_tokens(hidden_states)
        batch, length, channels = tokens.shape
        if batch % 2:
            raise ValueError(f"batch {batch} is odd: cross-domain attention needs [normals, colours] halves")
        half = batch // 2
        # (2, half, N, C) -> (half, 2, N, C) -> (half, 2N, C): row i of each domain in one group.
        grouped = tokens.reshape(2, half, length, channels).transpose(0, 1).reshape(half, 2 * length, channels)
        out = _grouped_self_attention(attn, grouped)
        out = out.reshape(half, 2, length, out.shape[-1]).transpose(0, 1).reshape(batch, length, out.shape[-1])
        if attn.residual_connection:
            out = out + tokens
        return _restore(out / attn.rescale_output_factor, shape)
