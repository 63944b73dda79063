"""m2mKD's networks: a ViT split into modules, the meta model, stitches, the hybrid forward, the MoE student.

Lo et al., "m2mKD: Module-to-Module Knowledge Distillation for Modular Transformers",
arXiv 2402.16918 (code: kamanphoebe/m2mKD, after Deep Incubation).

A monolithic teacher ViT is split into modules T_i (:func:`split_vit`), a shallow meta model
has one block per module (:class:`MetaModel`), and each student module S_i (with stitch
layers) runs in a hybrid network
    teacher path  logits_T = meta[i+1:](T_i(meta[0:i](x)))
    student path  logits_S = meta[i+1:](S_i(meta[0:i](x)))
(:func:`hybrid_forward`), with the meta prefix under no_grad. Student module i carries a
pre-stitch LayerNorm + Linear (meta dim -> student dim) unless it is the first module, and a
post-stitch LayerNorm + Linear (student dim -> meta dim) unless it is the last, as the
official vmoe.py builds them (`Block` / `MoeBlock`: `nn.Sequential(ln=LayerNorm, fc=Linear)`,
so the state-dict keys end in `pre_stitch.ln.*`, `pre_stitch.fc.*`, `post_stitch.ln.*`,
`post_stitch.fc.*` as there). The trained modules are then loaded into the modular student
(:class:`ModularStudent`, a ViT whose MLPs are token-wise mixture-of-experts layers) and
trained end to end. The loss and the training Methods are in :mod:`genforge.kd.m2mkd.method`.
"""

from collections import OrderedDict
from collections.abc import Sequence
from functools import partial

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

__all__ = ["MetaModel", "MoEMlp", "ModularStudent", "Stitched", "ViTStage", "hybrid_forward", "no_weight_decay_names",
           "split_vit", "student_module"]

# ----------------------------------------------------------------------------- splitting


class _ViTStem(nn.Module):
    """Patch embedding, prefix tokens and position embedding of a timm VisionTransformer."""

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self.patch_embed = vit.patch_embed
        self.cls_token = vit.cls_token
        self.reg_token = vit.reg_token
        self.pos_embed = vit.pos_embed
        self.pos_drop = vit.pos_drop
        self.patch_drop = vit.patch_drop
        self.norm_pre = vit.norm_pre
        self.no_embed_class = vit.no_embed_class
        self.dynamic_img_size = vit.dynamic_img_size
        self.num_prefix_tokens = vit.num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, T, D)
        x = self.patch_embed(x)
        x = VisionTransformer._pos_embed(self, x)
        return self.norm_pre(self.patch_drop(x))


class _ViTHead(nn.Module):
    """Final norm, pooling and classifier of a timm VisionTransformer."""

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self.norm = vit.norm
        self.attn_pool = vit.attn_pool
        self.fc_norm = vit.fc_norm
        self.head_drop = vit.head_drop
        self.head = vit.head
        self.global_pool = vit.global_pool
        self.num_prefix_tokens = vit.num_prefix_tokens
        self.pool_include_prefix = vit.pool_include_prefix

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, classes)
        x = VisionTransformer.pool(self, self.norm(x))
        return self.head(self.head_drop(self.fc_norm(x)))


class ViTStage(nn.Module):
    """One module of a split ViT: [stem] -> blocks -> [head]."""

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        stem: nn.Module | None = None,
        head: nn.Module | None = None,
    ):
        super().__init__()
        self.stem = stem
        self.blocks = nn.Sequential(*blocks)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stem is not None:
            x = self.stem(x)
        x = self.blocks(x)
        return self.head(x) if self.head is not None else x


def split_vit(vit: VisionTransformer, depths: Sequence[int]) -> nn.ModuleList:
    """Split a timm ViT into modules of `depths` blocks: module 0 takes images, the last returns logits.

    The modules share their parameters with `vit`.
    """
    if sum(depths) != len(vit.blocks) or any(d < 1 for d in depths):
        raise ValueError(
            f"depths {list(depths)} must be positive and sum to the {len(vit.blocks)} blocks of the ViT"
        )
    stages, start = [], 0
    for i, d in enumerate(depths):
        stages.append(
            ViTStage(
                list(vit.blocks[start : start + d]),
                stem=_ViTStem(vit) if i == 0 else None,
                head=_ViTHead(vit) if i == len(depths) - 1 else None,
            )
        )
        start += d
    return nn.ModuleList(stages)


class MetaModel(nn.Module):
    """The shallow meta ViT: one block per module, exposed as `stages` (same interface as a split teacher)."""

    def __init__(self, num_modules: int, **vit_kwargs):
        super().__init__()
        self.stages = split_vit(
            VisionTransformer(depth=num_modules, **vit_kwargs), [1] * num_modules
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x


# ----------------------------------------------------------------------------- stitching


def _stitch(in_dim: int, out_dim: int) -> nn.Sequential:
    """LayerNorm(in_dim) then Linear(in_dim -> out_dim), named `ln` and `fc` as in the official vmoe.py."""
    return nn.Sequential(
        OrderedDict(ln=nn.LayerNorm(in_dim), fc=nn.Linear(in_dim, out_dim))
    )


class Stitched(nn.Module):
    """Student module with a pre-stitch (LayerNorm + Linear meta -> student) and a post-stitch (LayerNorm + Linear student -> meta)."""

    def __init__(
        self,
        module: nn.Module,
        meta_dim: int,
        student_dim: int,
        first: bool,
        last: bool,
    ):
        super().__init__()
        self.pre_stitch = None if first else _stitch(meta_dim, student_dim)
        self.module = module
        self.post_stitch = None if last else _stitch(student_dim, meta_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_stitch is not None:
            x = self.pre_stitch(x)  # (B, T, meta) -> (B, T, student)
        x = self.module(x)
        if self.post_stitch is not None:
            x = self.post_stitch(x)  # (B, T, student) -> (B, T, meta)
        return x


def _resolve_index(index: int, n: int) -> int:
    if not -n <= index < n:
        raise ValueError(f"module index {index} out of range for {n} modules")
    return index % n


def hybrid_forward(
    meta_modules: Sequence[nn.Module], index: int, module: nn.Module, x: torch.Tensor
) -> torch.Tensor:
    """meta[0:i](x) under no_grad -> module -> meta[i+1:]; index -1 is the last module."""
    i = _resolve_index(index, len(meta_modules))
    with torch.no_grad():
        for stage in meta_modules[:i]:
            x = stage(x)
    x = module(x)
    for stage in meta_modules[i + 1 :]:
        x = stage(x)
    return x


# ----------------------------------------------------------------------------- modular student


class MoEMlp(nn.Module):
    """Token-wise mixture of expert MLPs with top-k gating (V-MoE style).

    Gate g = softmax(W_g x) over E experts; each token goes to its top-k experts and the
    outputs are summed with the gate weights renormalised over the chosen k.
    Takes timm's `mlp_layer` arguments, so it drops into `timm` Blocks.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        num_experts: int = 4,
        top_k: int = 1,
        act_layer=nn.GELU,
        norm_layer=None,
        bias: bool = True,
        drop: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in 1..{num_experts}, got {top_k}")
        if norm_layer is not None:
            raise ValueError(
                "MoEMlp has no inner norm (timm scale_mlp_norm must be False)"
            )
        hidden = hidden_features or 4 * in_features
        self.top_k = top_k
        dd = {"device": device, "dtype": dtype}
        self.gate = nn.Linear(in_features, num_experts, bias=False, **dd)
        self.experts = nn.ModuleList(
            nn.Sequential(
                nn.Linear(in_features, hidden, bias=bias, **dd),
                act_layer(),
                nn.Dropout(drop),
                nn.Linear(hidden, in_features, bias=bias, **dd),
                nn.Dropout(drop),
            )
            for _ in range(num_experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        tokens = x.reshape(-1, x.shape[-1])  # (B*T, D)
        weights, chosen = (
            self.gate(tokens).softmax(dim=-1).topk(self.top_k, dim=-1)
        )  # (B*T, k)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            if rows.numel():
                out.index_add_(
                    0, rows, weights[rows, slot, None] * expert(tokens[rows])
                )
        return out.reshape_as(x)


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Names of the position embeddings and prefix tokens of `model`, which timm's ViT keeps out of weight decay."""
    return {
        name
        for name, _ in model.named_parameters()
        if name.rsplit(".", 1)[-1] in ("pos_embed", "cls_token", "reg_token")
    }


class ModularStudent(nn.Module):
    """A ViT of MoE blocks split into modules, each wrapped in `Stitched` like during m2mKD.

    `student_module(i)` of a fresh instance is the module trained by pair i; `load_modules`
    loads the trained modules back with strict=True. With `keep_stitches=False` the stitch
    layers are dropped and only the inner modules are loaded.
    """

    def __init__(
        self,
        depths: Sequence[int],
        meta_dim: int,
        embed_dim: int,
        num_heads: int,
        num_classes: int,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_experts: int = 4,
        top_k: int = 1,
        mlp_ratio: float = 4.0,
        keep_stitches: bool = True,
    ):
        super().__init__()
        self.keep_stitches = keep_stitches
        vit = VisionTransformer(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            depth=sum(depths),
            num_heads=num_heads,
            num_classes=num_classes,
            mlp_ratio=mlp_ratio,
            mlp_layer=partial(MoEMlp, num_experts=num_experts, top_k=top_k),
        )
        stages = split_vit(vit, depths)
        n = len(depths)
        if keep_stitches:
            stages = [
                Stitched(s, meta_dim, embed_dim, first=i == 0, last=i == n - 1)
                for i, s in enumerate(stages)
            ]
        self.stages = nn.ModuleList(stages)

    def load_modules(self, state_dicts: Sequence[dict[str, torch.Tensor]]) -> None:
        """Load the state dicts of trained `Stitched` student modules, strictly."""
        if len(state_dicts) != len(self.stages):
            raise ValueError(
                f"got {len(state_dicts)} module state dicts for {len(self.stages)} modules"
            )
        for stage, sd in zip(self.stages, state_dicts):
            if not self.keep_stitches:
                sd = {
                    k[len("module.") :]: v
                    for k, v in sd.items()
                    if k.startswith("module.")
                }
            stage.load_state_dict(sd, strict=True)

    def no_weight_decay(self) -> set[str]:
        return no_weight_decay_names(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # images -> logits
        for stage in self.stages:
            x = stage(x)
        return x


def student_module(index: int, **student_kwargs) -> nn.Module:
    """A fresh student module `index` (with its stitches), as `ModularStudent(**student_kwargs)` builds it."""
    stages: list[nn.Module] = list(
        ModularStudent(keep_stitches=True, **student_kwargs).stages
    )
    return stages[_resolve_index(index, len(stages))]
