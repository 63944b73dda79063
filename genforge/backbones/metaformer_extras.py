"""IdentityFormer and RandFormer: MetaFormer with the weakest token mixers.

Yu et al., "MetaFormer Baselines for Vision", TPAMI 2023, arXiv 2210.13452, Sec. 3, and
the official ``metaformer_baselines.py`` of sail-sg/metaformer. Both are configurations of
timm's ``MetaFormer`` (timm has the class and StarReLU but registers neither model):

- MetaFormer block (res scale r in stages 3-4, as in the official configs)::

      x = r_1 x + TokenMixer(Norm(x));   x = r_2 x + MLP(Norm(x)),   MLP = fc2(StarReLU(fc1(x)))

  StarReLU(x) = s ReLU(x)^2 + b with learnable scalars s, b, initialised to s = 1, b = 0 by
  the official code (the paper derives s = 0.8944, b = -0.4472 for a unit Gaussian input).
- IdentityFormer: TokenMixer(X) = X in every stage.
- RandFormer: identity in stages 1-2; in stages 3-4, RandomMixing(X) = R X for the N x C
  token matrix X, with R = softmax(rand(N, N)) row-wise, drawn once and frozen. Every row
  of R sums to 1, so each token becomes a fixed convex combination of all tokens. R is a
  buffer here (a ``requires_grad=False`` Parameter in the official code; same state-dict
  key), so it never reaches an optimizer. N is fixed by the input size (196 and 49 at 224),
  so RandFormer's pretrained configs say ``fixed_input_size=True``; RandomMixing, which
  checks the size, is an FX leaf module.
- Layout: 7x7 stride-4 stem, 3x3 stride-2 downsamplings, GroupNorm-1 (no bias) before each
  mixer and MLP, LayerNorm-without-bias in stem/downsampling, mean-pool -> LN -> linear head.
"""

from __future__ import annotations

import torch
from timm.layers import register_notrace_module, to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models.metaformer import GroupNorm1NoBias, MetaFormer
from torch import nn

from genforge.backbones.registry import register_gf_model, register_official_converter

__all__ = ["MetaFormerBaseline", "RandomMixing", "stage_token_counts"]


@register_notrace_module  # reason: checks the token count, a Proxy under FX
class RandomMixing(nn.Module):
    """X -> R X over the N flattened tokens, R = softmax(U(0, 1)^(N x N)) row-wise, frozen at construction."""

    def __init__(self, num_tokens: int = 196, device=None, dtype=None):
        super().__init__()
        self.num_tokens = num_tokens
        self.register_buffer('random_matrix', torch.rand(num_tokens, num_tokens, device=device, dtype=dtype)
                             .softmax(dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if h * w != self.num_tokens:
            raise ValueError(f"RandomMixing was built for {self.num_tokens} tokens but got a {h}x{w} map; "
                             f"create the model with the img_size it will see")
        mixed = torch.einsum('mn,bcn->bcm', self.random_matrix, x.reshape(b, c, h * w))  # (B, C, N)
        return mixed.reshape(b, c, h, w)


class MetaFormerBaseline(MetaFormer):
    """timm's ``MetaFormer`` plus the two contract methods it lacks and RandFormer's mixers.

    ``random_mixing[i]`` True puts a :class:`RandomMixing` in every block of stage i, over
    the stage's token count at ``img_size`` (an int or (H, W); timm passes the pretrained
    config's input size, as the config says ``fixed_input_size``). They are set after timm
    builds the stages because ``MetaFormerStage`` takes a mixer class, which cannot carry a
    per-stage N.
    """

    def __init__(self, random_mixing: tuple[bool, ...] | None = None,
                 img_size: int | tuple[int, int] | None = None, **kwargs):
        super().__init__(**kwargs)
        if random_mixing is None:
            if img_size is not None:
                raise ValueError(f"img_size={img_size} only applies to a model with random mixing (RandFormer)")
            return
        if len(random_mixing) != self.num_stages:
            raise ValueError(f"random_mixing needs one entry per stage ({self.num_stages}); got {random_mixing}")
        if img_size is None:
            raise ValueError("random mixing needs the img_size that fixes its token counts")
        dd = dict(device=kwargs.get('device'), dtype=kwargs.get('dtype'))
        for stage, mixing, num_tokens in zip(self.stages, random_mixing, stage_token_counts(img_size)):
            if mixing:
                for blk in stage.blocks:
                    blk.token_mixer = RandomMixing(num_tokens, **dd)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The final norm, as the official ``no_weight_decay`` ({'norm'})."""
        return {'head.norm'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r'^stem', blocks=r'^stages\.(\d+)' if coarse else [
            (r'^stages\.(\d+)\.downsample', (0,)),
            (r'^stages\.(\d+)\.blocks\.(\d+)', None)])


def stage_token_counts(img_size: int | tuple[int, int]) -> tuple[int, int, int, int]:
    """Tokens per stage: the stem is a 7x7 stride-4 conv with padding 2, then 3x3 stride-2 convs."""
    sides = [(s + 2 * 2 - 7) // 4 + 1 for s in to_2tuple(img_size)]
    counts = []
    for _ in range(4):
        counts.append(sides[0] * sides[1])
        sides = [(s + 2 - 3) // 2 + 1 for s in sides]
    return tuple(counts)


@register_official_converter("gf_identityformer")
@register_official_converter("gf_randformer")
def convert_official(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Official ``metaformer_baselines.py`` keys -> timm's MetaFormer (our own layout passes through).

    ``downsample_layers.0.{conv,post_norm}`` -> ``stem.{conv,norm}``;
    ``downsample_layers.i.{pre_norm,conv}`` -> ``stages.i.downsample.{norm,conv}``;
    ``stages.i.j`` -> ``stages.i.blocks.j``; ``norm``/``head`` -> ``head.norm``/``head.fc``. The
    official MLP is ``nn.Linear`` on channels-last maps and timm's a 1x1 conv, so equal-sized
    weights are reshaped to ours.
    """
    if 'stem.conv.weight' in state_dict:
        return dict(state_dict)
    ours = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        parts = key.split('.')
        if parts[0] == 'downsample_layers':
            leaf = {'pre_norm': 'norm', 'post_norm': 'norm'}.get(parts[2], parts[2])
            rest = '.'.join([leaf] + parts[3:])
            key = f'stem.{rest}' if parts[1] == '0' else f'stages.{parts[1]}.downsample.{rest}'
        elif parts[0] == 'stages':
            key = f'stages.{parts[1]}.blocks.{parts[2]}.' + '.'.join(parts[3:])
        elif parts[0] in ('norm', 'head'):
            key = f"head.{'norm' if parts[0] == 'norm' else 'fc'}.{parts[1]}"
        if key in ours and value.shape != ours[key].shape and value.numel() == ours[key].numel():
            value = value.reshape(ours[key].shape)
        out[key] = value
    return out


def _create(variant: str, pretrained: bool = False, **kwargs) -> MetaFormerBaseline:
    return build_model_with_cfg(MetaFormerBaseline, variant, pretrained, pretrained_filter_fn=convert_official,
                                feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3)), **kwargs)


def _identityformer(variant: str, pretrained: bool, depths, dims, **kwargs) -> MetaFormerBaseline:
    return _create(variant, pretrained, depths=depths, dims=dims, token_mixers=nn.Identity,
                   norm_layers=GroupNorm1NoBias, use_mlp_head=False, **kwargs)


def _randformer(variant: str, pretrained: bool, depths, dims, **kwargs) -> MetaFormerBaseline:
    return _create(variant, pretrained, depths=depths, dims=dims, token_mixers=nn.Identity,
                   random_mixing=(False, False, True, True), norm_layers=GroupNorm1NoBias,
                   use_mlp_head=False, **kwargs)


def _cfg(**kwargs) -> dict:
    return {**dict(num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.9,
                   interpolation='bicubic', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                   first_conv='stem.conv', classifier='head.fc', paper_ids='arXiv:2210.13452',
                   license='apache-2.0'), **kwargs}


_NANO = dict(input_size=(3, 32, 32), pool_size=(1, 1))
_SIZES = ('s12', 's24', 's36', 'm36', 'm48')
default_cfgs = generate_default_cfgs({
    **{f'gf_identityformer_{size}.untrained': _cfg() for size in _SIZES},
    **{f'gf_randformer_{size}.untrained': _cfg(fixed_input_size=True) for size in _SIZES},
    'gf_identityformer_nano.untrained': _cfg(**_NANO),
    'gf_randformer_nano.untrained': _cfg(**_NANO, fixed_input_size=True),
})

_S, _M = (64, 128, 320, 512), (96, 192, 384, 768)
_NANO_DEPTHS, _NANO_DIMS = (1, 1, 2, 1), (16, 32, 48, 64)


@register_gf_model
def gf_identityformer_s12(pretrained: bool = False, **kwargs) -> MetaFormerBaseline:
    """IdentityFormer-S12: 11.9M params, 74.6% ImageNet-1k top-1."""
    return _identityformer('gf_identityformer_s12', pretrained, (2, 2, 6, 2), _S, **kwargs)


@register_gf_model
def gf_identityformer_s24(pretrained: bool = False, **kwargs) -> MetaFormerBaseline:
    """IdentityFormer-S24: 21.3M params, 78.2% ImageNet-1k top-1."""
    return _identityformer('gf_identityformer_s24', pretrained, (4, 4, 12, 4), _S, **kwargs)


@register_gf_model
def gf_identityformer_s36(pretrained: bool = False, **kwargs) -> MetaFormerBaseline:
    """IdentityFormer-S36: 30.8M params, 79.3% ImageNet-1k top-1."""
    return _identityformer('gf_identityformer_s36', pretrained, (6, 6, 18, 6), _S, **kwargs)


@register_gf_model
def gf_identityformer_m36(pretrained: bool = False, **kwargs) -> MetaFormerBaseline:
    """IdentityFormer-M36: 56.1M params, 80.0% ImageNet-1k top-1."""
    return _identityformer('gf_identityformer_m36', pretrained, (6, 6, 18, 6), _M, **kwargs)


@register_gf_model
def gf_identityformer_m48(pretrained: bool = False, **kwargs) -> MetaFormerBaseline:
    """IdentityFormer-M48: 73.3M params, 80.4% ImageNet-1k top-1."""
    return _identityformer('gf_identityformer_m48', pretrained, (8, 8, 24, 8), _M, **kwargs)


@register_gf_model
def gf_randformer_s12(pretrained: bool = False, **kwargs) -> MetaFormerBaseline:
    """RandFormer-S12: 11.9M params + 0.2M frozen, 76.6% ImageNet-1k top-1."""
    return _randformer('gf_randformer_s12', pretrained, (2, 2, 6, 2), _S, **kwargs)


@register_gf_model
def gf_randformer_s24(pretrained: bool = False, **kwargs) -> MetaFormerBaseline:
    """RandFormer-S24: 21.3M params + 0.5M frozen, 78.2% ImageNet-1k top-1."""
    return _randformer('gf_randformer_s24', pretrained, (4, 4, 12, 4), _S, **kwargs)


@register_gf_model
def gf_randformer_s36(pretrained: bool = False, **kwargs) -> MetaFormerBaseline:
    """RandFormer-S36: 30.8M params + 0.7M frozen, 79.5% ImageNet-1k top-1."""
    return _randformer('gf_randformer_s36', pretrained, (6, 6, 18, 6), _S, **kwargs)


@register_gf_model
def gf_randformer_m36(pretrained: bool = False, **kwargs) -> MetaFormerBaseline:
    """RandFormer-M36: 56.1M params + 0.7M frozen, 81.2% ImageNet-1k top-1."""
    return _randformer('gf_randformer_m36', pretrained, (6, 6, 18, 6), _M, **kwargs)


@register_gf_model
def gf_randformer_m48(pretrained: bool = False, **kwargs) -> MetaFormerBaseline:
    """RandFormer-M48: 73.3M params + 0.9M frozen, 81.4% ImageNet-1k top-1."""
    return _randformer('gf_randformer_m48', pretrained, (8, 8, 24, 8), _M, **kwargs)


@register_gf_model
def gf_identityformer_nano(pretrained: bool = False, **kwargs) -> MetaFormerBaseline:
    """A test-sized IdentityFormer (32x32 input): widths 16-64, five blocks."""
    return _identityformer('gf_identityformer_nano', pretrained, _NANO_DEPTHS, _NANO_DIMS, **kwargs)


@register_gf_model
def gf_randformer_nano(pretrained: bool = False, **kwargs) -> MetaFormerBaseline:
    """A test-sized RandFormer (32x32 input: 4 and 1 tokens in stages 3-4), widths 16-64."""
    return _randformer('gf_randformer_nano', pretrained, _NANO_DEPTHS, _NANO_DIMS, **kwargs)
