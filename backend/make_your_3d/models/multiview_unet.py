"""The multi-view UNet: loads Wonder3D v1.0's published `unet/` folder unchanged (our own code).

Layout (checked against Wonder3D's `mvdiffusion/models/unet_mv2d_condition.py`,
`unet_mv2d_blocks.py`, `transformer_mv2d.py` and the published `unet/config.json`): the SD 1.x 2D
UNet (`down_blocks`/`mid_block`/`up_blocks`, diffusers' resnets and resamplers) with
`in_channels` 8 (noisy latent + VAE latent of the input image), `class_embedding` =
`TimestepEmbedding(10, 4*C0)` of the per-view camera/domain vector, and in every cross-attention
block a transformer whose blocks are, in order:

    norm1 -> attn1 (multi-view self-attention)                       + residual
    norm_joint_mid -> attn_joint_mid (cross-domain attention)         + residual
    norm2 -> attn2 (cross-attention to the CLIP image embedding)      + residual
    norm3 -> ff (GEGLU feed-forward)                                  + residual

Older checkpoints name the cross-domain layers `attn_joint_twice`/`norm_joint_twice`; they are
renamed at load. Loading never random-initialises: any missing, unexpected or mis-shaped key fails
with `CheckpointMismatch` naming the keys.

Forward contract (documented for the subject-prior optimisation):
    unet(sample (2*B*V, 8, h, w), timestep, encoder_hidden_states (2*B*V, 1, D),
         class_labels (2*B*V, 10)).sample -> (2*B*V, 4, h, w)
with the batch laid out `[normals(B*V), colours(B*V)]` (see `multiview_attention.py`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders.peft import PeftAdapterMixin
from diffusers.models.activations import get_activation
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from diffusers.models.unets.unet_2d_blocks import DownBlock2D, UpBlock2D
from diffusers.utils import BaseOutput
from torch import nn

from make_your_3d.errors import WeightsMissing
from make_your_3d.models.multiview_attention import JointAttnProcessor, MultiViewAttnProcessor

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
PICKLE_WEIGHTS_NAME = "diffusion_pytorch_model.bin"

# Legacy (older Wonder3D code) -> current module names of the cross-domain attention.
LEGACY_RENAMES = {".attn_joint_twice.": ".attn_joint_mid.", ".norm_joint_twice.": ".norm_joint_mid."}
CROSS_DOMAIN_LINEARS = ("to_q", "to_k", "to_v", "to_out.0")


class CheckpointMismatch(WeightsMissing):
    """The checkpoint's keys or shapes do not match the architecture its config describes."""


# --- transformer ---------------------------------------------------------------------------


class MVTransformerBlock(nn.Module):
    """One transformer block: multi-view self-attn, cross-domain attn, image cross-attn, GEGLU FF.

    Its own class because the cross-domain attention sits between `attn1`'s residual and `attn2`,
    which an attention processor alone cannot express.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        cross_attention_dim: int,
        num_views: int,
        cross_domain: bool,
        multiview: bool = True,
        upcast_attention: bool = False,
        attention_bias: bool = False,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(
            query_dim=dim,
            heads=heads,
            dim_head=head_dim,
            bias=attention_bias,
            upcast_attention=upcast_attention,
            processor=MultiViewAttnProcessor(num_views if multiview else 1),
        )
        self.cross_domain = cross_domain
        if cross_domain:
            self.norm_joint_mid = nn.LayerNorm(dim)
            self.attn_joint_mid = Attention(
                query_dim=dim,
                heads=heads,
                dim_head=head_dim,
                bias=attention_bias,
                upcast_attention=upcast_attention,
                processor=JointAttnProcessor(),
            )
            # Zero-initialised output, as in Wonder3D: a fresh block starts as the identity.
            nn.init.zeros_(self.attn_joint_mid.to_out[0].weight)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(
            query_dim=dim,
            cross_attention_dim=cross_attention_dim,
            heads=heads,
            dim_head=head_dim,
            bias=attention_bias,
            upcast_attention=upcast_attention,
            processor=AttnProcessor2_0(),
        )
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, activation_fn="geglu")

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.attn1(self.norm1(hidden_states)) + hidden_states
        if self.cross_domain:
            hidden_states = self.attn_joint_mid(self.norm_joint_mid(hidden_states)) + hidden_states
        hidden_states = self.attn2(self.norm2(hidden_states), encoder_hidden_states=encoder_hidden_states) + hidden_states
        return self.ff(self.norm3(hidden_states)) + hidden_states


class TransformerMV2D(nn.Module):
    """GroupNorm -> proj_in -> MV transformer blocks -> proj_out, with the input residual (SD layout)."""

    def __init__(
        self,
        heads: int,
        head_dim: int,
        in_channels: int,
        num_layers: int,
        cross_attention_dim: int,
        norm_num_groups: int,
        use_linear_projection: bool,
        num_views: int,
        cross_domain: bool,
        multiview: bool,
        upcast_attention: bool,
    ):
        super().__init__()
        inner = heads * head_dim
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(num_groups=norm_num_groups, num_channels=in_channels, eps=1e-6, affine=True)
        if use_linear_projection:
            self.proj_in = nn.Linear(in_channels, inner)
            self.proj_out = nn.Linear(inner, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner, kernel_size=1)
            self.proj_out = nn.Conv2d(inner, in_channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            [
                MVTransformerBlock(inner, heads, head_dim, cross_attention_dim, num_views, cross_domain, multiview, upcast_attention)
                for _ in range(num_layers)
            ]
        )

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = hidden_states.shape
        residual = hidden_states
        hidden_states = self.norm(hidden_states)
        if self.use_linear_projection:
            hidden_states = hidden_states.permute(0, 2, 3, 1).reshape(batch, height * width, -1)
            hidden_states = self.proj_in(hidden_states)
        else:
            hidden_states = self.proj_in(hidden_states)
            hidden_states = hidden_states.permute(0, 2, 3, 1).reshape(batch, height * width, -1)
        for block in self.transformer_blocks:
            hidden_states = block(hidden_states, encoder_hidden_states)
        if self.use_linear_projection:
            hidden_states = self.proj_out(hidden_states)
            hidden_states = hidden_states.reshape(batch, height, width, -1).permute(0, 3, 1, 2).contiguous()
        else:
            hidden_states = hidden_states.reshape(batch, height, width, -1).permute(0, 3, 1, 2).contiguous()
            hidden_states = self.proj_out(hidden_states)
        return hidden_states + residual


@dataclass(frozen=True)
class _AttnOptions:
    heads: int
    cross_attention_dim: int
    transformer_layers: int
    num_views: int
    cross_domain: bool
    multiview: bool
    use_linear_projection: bool
    upcast_attention: bool
    norm_num_groups: int

    def transformer(self, channels: int) -> TransformerMV2D:
        return TransformerMV2D(
            self.heads,
            channels // self.heads,
            channels,
            self.transformer_layers,
            self.cross_attention_dim,
            self.norm_num_groups,
            self.use_linear_projection,
            self.num_views,
            self.cross_domain,
            self.multiview,
            self.upcast_attention,
        )


def _resnet(in_ch: int, out_ch: int, temb: int, groups: int, eps: float, act: str, time_norm: str, scale: float = 1.0) -> ResnetBlock2D:
    return ResnetBlock2D(
        in_channels=in_ch,
        out_channels=out_ch,
        temb_channels=temb,
        eps=eps,
        groups=groups,
        non_linearity=act,
        time_embedding_norm=time_norm,
        output_scale_factor=scale,
    )


class CrossAttnDownBlockMV2D(nn.Module):
    has_cross_attention = True

    def __init__(self, in_ch: int, out_ch: int, temb: int, num_layers: int, add_downsample: bool, downsample_padding: int, groups: int, eps: float, act: str, time_norm: str, opts: _AttnOptions):
        super().__init__()
        self.resnets = nn.ModuleList([_resnet(in_ch if i == 0 else out_ch, out_ch, temb, groups, eps, act, time_norm) for i in range(num_layers)])
        self.attentions = nn.ModuleList([opts.transformer(out_ch) for _ in range(num_layers)])
        self.downsamplers = (
            nn.ModuleList([Downsample2D(out_ch, use_conv=True, out_channels=out_ch, padding=downsample_padding, name="op")]) if add_downsample else None
        )

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        outputs: tuple[torch.Tensor, ...] = ()
        for resnet, attn in zip(self.resnets, self.attentions):
            hidden_states = attn(resnet(hidden_states, temb), encoder_hidden_states)
            outputs += (hidden_states,)
        if self.downsamplers is not None:
            for down in self.downsamplers:
                hidden_states = down(hidden_states)
            outputs += (hidden_states,)
        return hidden_states, outputs


class UNetMidBlockMV2DCrossAttn(nn.Module):
    has_cross_attention = True

    def __init__(self, channels: int, temb: int, groups: int, eps: float, act: str, time_norm: str, scale: float, opts: _AttnOptions):
        super().__init__()
        self.resnets = nn.ModuleList([_resnet(channels, channels, temb, groups, eps, act, time_norm, scale) for _ in range(2)])
        self.attentions = nn.ModuleList([opts.transformer(channels)])

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.resnets[0](hidden_states, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            hidden_states = resnet(attn(hidden_states, encoder_hidden_states), temb)
        return hidden_states


class CrossAttnUpBlockMV2D(nn.Module):
    has_cross_attention = True

    def __init__(self, in_ch: int, prev_ch: int, out_ch: int, temb: int, num_layers: int, add_upsample: bool, groups: int, eps: float, act: str, time_norm: str, opts: _AttnOptions):
        super().__init__()
        resnets = []
        for i in range(num_layers):
            skip = in_ch if i == num_layers - 1 else out_ch
            resnets.append(_resnet((prev_ch if i == 0 else out_ch) + skip, out_ch, temb, groups, eps, act, time_norm))
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList([opts.transformer(out_ch) for _ in range(num_layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch, use_conv=True, out_channels=out_ch)]) if add_upsample else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        res_hidden_states_tuple: tuple[torch.Tensor, ...],
        temb: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        upsample_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        for resnet, attn in zip(self.resnets, self.attentions):
            skip = res_hidden_states_tuple[-1]
            res_hidden_states_tuple = res_hidden_states_tuple[:-1]
            hidden_states = torch.cat([hidden_states, skip], dim=1)
            hidden_states = attn(resnet(hidden_states, temb), encoder_hidden_states)
        if self.upsamplers is not None:
            for up in self.upsamplers:
                hidden_states = up(hidden_states, upsample_size)
        return hidden_states


# --- the model -----------------------------------------------------------------------------


@dataclass
class MVUNetOutput(BaseOutput):
    sample: torch.Tensor


# Config values our implementation supports for keys that Wonder3D carries but never varies.
_FIXED_CONFIG = {
    "center_input_sample": False,
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "addition_embed_type": None,
    "num_class_embeds": None,
    "class_embeddings_concat": False,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "num_attention_heads": None,
    "cross_attention_norm": None,
    "resnet_skip_time_act": False,
    "cd_attention_last": False,
    "joint_attention": False,
    "sparse_mv_attention": False,
    "mvcd_attention": False,
    "cross_domain_attention": False,
}


class UNetMV2DConditionModel(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Wonder3D-compatible multi-view, cross-domain UNet (same class name and config keys).

    `from_pretrained(folder)` reads `config.json` + `diffusion_pytorch_model.safetensors` from a
    local folder and loads strictly; `save_pretrained(folder)` writes the same two files. diffusers'
    `PeftAdapterMixin` gives it `add_adapter`/`set_adapters`/... for the LoRA of the subject prior.
    """

    config_name = CONFIG_NAME
    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        sample_size: int | None = 32,
        in_channels: int = 8,
        out_channels: int = 4,
        center_input_sample: bool = False,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = ("CrossAttnDownBlockMV2D", "CrossAttnDownBlockMV2D", "CrossAttnDownBlockMV2D", "DownBlock2D"),
        mid_block_type: str = "UNetMidBlockMV2DCrossAttn",
        up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlockMV2D", "CrossAttnUpBlockMV2D", "CrossAttnUpBlockMV2D"),
        only_cross_attention: bool = False,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        act_fn: str = "silu",
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 768,
        transformer_layers_per_block: int = 1,
        encoder_hid_dim: int | None = None,
        encoder_hid_dim_type: str | None = None,
        attention_head_dim: int = 8,
        num_attention_heads: int | None = None,
        dual_cross_attention: bool = False,
        use_linear_projection: bool = False,
        class_embed_type: str | None = "projection",
        addition_embed_type: str | None = None,
        addition_time_embed_dim: int | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        resnet_skip_time_act: bool = False,
        resnet_out_scale_factor: float = 1.0,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        time_embedding_act_fn: str | None = None,
        timestep_post_act: str | None = None,
        time_cond_proj_dim: int | None = None,
        conv_in_kernel: int = 3,
        conv_out_kernel: int = 3,
        projection_class_embeddings_input_dim: int | None = 10,
        class_embeddings_concat: bool = False,
        mid_block_only_cross_attention: bool | None = None,
        cross_attention_norm: str | None = None,
        addition_embed_type_num_heads: int = 64,
        num_views: int = 6,
        cd_attention_last: bool = False,
        cd_attention_mid: bool = True,
        multiview_attention: bool = True,
        sparse_mv_attention: bool = False,
        mvcd_attention: bool = False,
        joint_attention: bool = False,
        joint_attention_twice: bool = False,
        cross_domain_attention: bool = False,
    ):
        super().__init__()
        given = dict(locals())
        bad = {k: given[k] for k, v in _FIXED_CONFIG.items() if given[k] != v}
        if bad:
            raise ValueError(f"unsupported multi-view UNet config values (this implementation covers Wonder3D v1.0): {bad}")
        if class_embed_type != "projection" or not projection_class_embeddings_input_dim:
            raise ValueError("the multi-view UNet needs class_embed_type 'projection' with projection_class_embeddings_input_dim (10 for Wonder3D)")
        if len(down_block_types) != len(up_block_types) or len(block_out_channels) != len(down_block_types):
            raise ValueError("down_block_types, up_block_types and block_out_channels must have the same length")
        if mid_block_type != "UNetMidBlockMV2DCrossAttn":
            raise ValueError(f"unsupported mid_block_type {mid_block_type!r}; expected 'UNetMidBlockMV2DCrossAttn'")
        for name, value in (("layers_per_block", layers_per_block), ("attention_head_dim", attention_head_dim), ("cross_attention_dim", cross_attention_dim), ("transformer_layers_per_block", transformer_layers_per_block)):
            if not isinstance(value, int):
                raise ValueError(f"{name} must be one integer for this implementation, got {value!r}")

        self.sample_size = sample_size
        c0 = block_out_channels[0]
        time_dim = time_embedding_dim or c0 * 4
        # Legacy naming: SD's `attention_head_dim` is really the number of heads.
        opts = _AttnOptions(
            heads=attention_head_dim,
            cross_attention_dim=cross_attention_dim,
            transformer_layers=transformer_layers_per_block,
            num_views=num_views,
            cross_domain=bool(cd_attention_mid),
            multiview=multiview_attention,
            use_linear_projection=use_linear_projection,
            upcast_attention=upcast_attention,
            norm_num_groups=norm_num_groups,
        )
        pad_in, pad_out = (conv_in_kernel - 1) // 2, (conv_out_kernel - 1) // 2
        self.conv_in = nn.Conv2d(in_channels, c0, kernel_size=conv_in_kernel, padding=pad_in)
        self.time_proj = Timesteps(c0, flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(c0, time_dim, act_fn=act_fn)
        self.class_embedding = TimestepEmbedding(projection_class_embeddings_input_dim, time_dim)

        common = dict(groups=norm_num_groups, eps=norm_eps, act=act_fn, time_norm=resnet_time_scale_shift)
        self.down_blocks = nn.ModuleList()
        out_ch = c0
        for i, kind in enumerate(down_block_types):
            in_ch, out_ch = out_ch, block_out_channels[i]
            last = i == len(block_out_channels) - 1
            if kind == "CrossAttnDownBlockMV2D":
                block = CrossAttnDownBlockMV2D(in_ch, out_ch, time_dim, layers_per_block, not last, downsample_padding, opts=opts, **common)
            elif kind == "DownBlock2D":
                block = DownBlock2D(
                    in_channels=in_ch, out_channels=out_ch, temb_channels=time_dim, num_layers=layers_per_block, resnet_eps=norm_eps,
                    resnet_time_scale_shift=resnet_time_scale_shift, resnet_act_fn=act_fn, resnet_groups=norm_num_groups,
                    add_downsample=not last, downsample_padding=downsample_padding,
                )
            else:
                raise ValueError(f"unsupported down block type {kind!r}")
            self.down_blocks.append(block)

        # Older Wonder3D code (`joint_attention_twice` without `cd_attention_mid`) put the
        # cross-domain attention in the mid block only; the current code puts it in every block.
        mid_opts = dataclasses.replace(opts, cross_domain=bool(cd_attention_mid or joint_attention_twice))
        self.mid_block = UNetMidBlockMV2DCrossAttn(block_out_channels[-1], time_dim, scale=mid_block_scale_factor, opts=mid_opts, **common)

        self.up_blocks = nn.ModuleList()
        reversed_ch = list(reversed(block_out_channels))
        out_ch = reversed_ch[0]
        for i, kind in enumerate(up_block_types):
            last = i == len(block_out_channels) - 1
            prev_ch, out_ch = out_ch, reversed_ch[i]
            in_ch = reversed_ch[min(i + 1, len(block_out_channels) - 1)]
            if kind == "CrossAttnUpBlockMV2D":
                block = CrossAttnUpBlockMV2D(in_ch, prev_ch, out_ch, time_dim, layers_per_block + 1, not last, opts=opts, **common)
            elif kind == "UpBlock2D":
                block = UpBlock2D(
                    in_channels=in_ch, prev_output_channel=prev_ch, out_channels=out_ch, temb_channels=time_dim,
                    num_layers=layers_per_block + 1, resnet_eps=norm_eps, resnet_time_scale_shift=resnet_time_scale_shift,
                    resnet_act_fn=act_fn, resnet_groups=norm_num_groups, add_upsample=not last,
                )
            else:
                raise ValueError(f"unsupported up block type {kind!r}")
            self.up_blocks.append(block)
        self.num_upsamplers = len(block_out_channels) - 1

        self.conv_norm_out = nn.GroupNorm(num_channels=c0, num_groups=norm_num_groups, eps=norm_eps)
        self.conv_act = get_activation(act_fn)
        self.conv_out = nn.Conv2d(c0, out_channels, kernel_size=conv_out_kernel, padding=pad_out)

    # -- forward ---------------------------------------------------------------------------

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor,
        return_dict: bool = True,
    ) -> MVUNetOutput | tuple[torch.Tensor]:
        """sample (2*B*V, 8, h, w), timestep (scalar or (2*B*V,)), encoder_hidden_states
        (2*B*V, 1, D), class_labels (2*B*V, 10) in the [normals, colours] layout -> noise (2*B*V, 4, h, w)."""
        batch = sample.shape[0]
        if class_labels is None or class_labels.shape[0] != batch:
            raise ValueError("class_labels (one camera/domain vector per batch row) are required")
        factor = 2**self.num_upsamplers
        upsample_size_needed = any(s % factor for s in sample.shape[-2:])

        timesteps = timestep if torch.is_tensor(timestep) else torch.tensor([timestep], device=sample.device)
        if timesteps.ndim == 0:
            timesteps = timesteps[None]
        timesteps = timesteps.to(sample.device).expand(batch)
        dtype = self.conv_in.weight.dtype
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype))
        emb = emb + self.class_embedding(class_labels.to(dtype))
        encoder_hidden_states = encoder_hidden_states.to(dtype)

        sample = self.conv_in(sample.to(dtype))
        skips: tuple[torch.Tensor, ...] = (sample,)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, res = block(sample, emb, encoder_hidden_states)
            else:
                sample, res = block(sample, emb)
            skips += res

        sample = self.mid_block(sample, emb, encoder_hidden_states)

        for i, block in enumerate(self.up_blocks):
            res = skips[-len(block.resnets):]
            skips = skips[: -len(block.resnets)]
            size = skips[-1].shape[2:] if (upsample_size_needed and i < len(self.up_blocks) - 1) else None
            if getattr(block, "has_cross_attention", False):
                sample = block(sample, res, emb, encoder_hidden_states, upsample_size=size)
            else:
                sample = block(sample, res, emb, upsample_size=size)

        sample = self.conv_out(self.conv_act(self.conv_norm_out(sample)))
        if not return_dict:
            return (sample,)
        return MVUNetOutput(sample=sample)

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        **kwargs,
    ) -> "UNetMV2DConditionModel":
        """Strict local load of a Wonder3D `unet/` folder (config.json + safetensors weights).

        Legacy `*_joint_twice` keys are renamed; anything else that does not match fails with
        `CheckpointMismatch` naming the keys. Nothing is downloaded and no pickle is read.
        """
        harmless = {"use_safetensors": True, "local_files_only": True, "low_cpu_mem_usage": True}
        unsupported = sorted(k for k, v in kwargs.items() if harmless.get(k, not v) != v)
        if unsupported:
            raise TypeError(f"unsupported from_pretrained arguments for the multi-view UNet: {unsupported}")
        folder = Path(pretrained_model_name_or_path)
        if subfolder:
            folder = folder / subfolder
        config_path = folder / CONFIG_NAME
        weights_path = folder / WEIGHTS_NAME
        if not config_path.is_file():
            raise WeightsMissing(f"{config_path} does not exist: the multi-view UNet folder is incomplete. Run `make-your-3d models fetch --role multiview`.")
        if not weights_path.is_file():
            hint = " (only the pickle .bin is there; `models fetch` converts it to safetensors)" if (folder / PICKLE_WEIGHTS_NAME).is_file() else ""
            raise WeightsMissing(f"{weights_path} does not exist{hint}. Run `make-your-3d models fetch --role multiview`.")
        try:
            config = json.loads(config_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointMismatch(f"{config_path} is not valid JSON ({exc}).") from None
        # Built on the meta device and filled by assignment: no random init, no second copy in memory.
        try:
            with torch.device("meta"):
                model = cls.from_config(config)
        except ValueError as exc:
            raise CheckpointMismatch(f"{config_path} describes a UNet this code does not implement: {exc}") from None
        state = read_checkpoint(weights_path)
        load_strict(model, state, str(weights_path), dtype=torch_dtype or torch.float32, assign=True)
        model.register_to_config(_name_or_path=str(folder))
        return model.eval()


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors state dict, naming the file if it is truncated or corrupt."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises SafetensorError / OSError for broken files
        raise CheckpointMismatch(f"{path} is not a readable safetensors file ({exc}); re-run `make-your-3d models fetch --role multiview`.") from None


def rename_legacy_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map older Wonder3D names (`attn_joint_twice`, `norm_joint_twice`) to `*_joint_mid`."""
    out = {}
    for key, value in state.items():
        for old, new in LEGACY_RENAMES.items():
            key = key.replace(old, new)
        out[key] = value
    return out


def load_strict(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    source: str = "checkpoint",
    dtype: torch.dtype | None = None,
    assign: bool = False,
) -> None:
    """Copy `state` into `model` (legacy names renamed), failing loudly, naming the keys, on any
    missing, unexpected or mis-shaped key. `assign` adopts the tensors (for a meta-device model),
    cast to `dtype` (default: each parameter's current dtype)."""
    state = rename_legacy_keys(state)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected)):
            if keys:
                parts.append(f"{len(keys)} {label}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}")
        if mismatched:
            shown = ", ".join(f"{k} {list(state[k].shape)} != {list(expected[k].shape)}" for k in mismatched[:8])
            parts.append(f"{len(mismatched)} mis-shaped keys: {shown}")
        raise CheckpointMismatch(f"{source} does not match the multi-view UNet its config describes: {'; '.join(parts)}.")
    state = {k: v.to(dtype or expected[k].dtype).contiguous() for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=assign)


# --- what the subject-prior optimisation trains ----------------------------------------------


def cross_domain_module_names(unet: nn.Module) -> list[str]:
    """Qualified names of the cross-domain attention's Linear layers (peft `target_modules`).

    These are `...attn_joint_mid.{to_q,to_k,to_v,to_out.0}` in every transformer block: exactly the
    layers Wonder3D's own second training stage trains.
    """
    names = [
        f"{name}.{leaf}"
        for name, module in unet.named_modules()
        if name.endswith("attn_joint_mid") and isinstance(module, Attention)
        for leaf in CROSS_DOMAIN_LINEARS
    ]
    if not names:
        raise ValueError("this UNet has no cross-domain attention (attn_joint_mid); check cd_attention_mid in its config")
    return names


def cross_domain_parameters(unet: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter of the cross-domain attention and its norm (`attn_joint_mid`, `norm_joint_mid`)."""
    params = {n: p for n, p in unet.named_parameters() if ".attn_joint_mid." in n or ".norm_joint_mid." in n}
    if not params:
        raise ValueError("this UNet has no cross-domain attention (attn_joint_mid); check cd_attention_mid in its config")
    return params


def save_with_legacy_names(unet: UNetMV2DConditionModel, folder: Path) -> None:
    """Save like `save_pretrained` but with the older `*_joint_twice` key names (for compatibility tests)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    unet.save_pretrained(folder)
    state = {}
    for key, value in unet.state_dict().items():
        for old, new in LEGACY_RENAMES.items():
            key = key.replace(new, old)
        state[key] = value.detach().contiguous()
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
