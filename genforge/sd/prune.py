"""Block removal for Stable Diffusion UNets: BK-SDM's plans and A-SDM's plan on top of them.

BK-SDM (Kim et al., "BK-SDM: A Lightweight, Fast, and Cheap Version of Stable Diffusion",
arXiv 2305.15798) removes whole residual+attention pairs from diffusers'
``UNet2DConditionModel`` and initialises the student by copying the teacher's weights. The
plans and the copy map follow the official code (Nota-NetsPresso/BK-SDM,
``src/unet_config/bk_*/config.json`` and ``copy_weight_from_teacher`` in
``src/kd_train_text_to_image.py``); ``tests/fixtures/bk_sdm_official_keys.json`` records the
official student keys, shapes and teacher sources for SD-1.x, and the tests check this module
against it:

- ``bk-base``: ``layers_per_block=1``. Down stages keep their first ResNet(+attention); up
  stages (built by diffusers with ``layers_per_block + 1`` layers) keep the first and the last,
  so student ``up_blocks.j.{resnets,attentions}.1`` <- teacher index ``layers_per_block``
  (2 for SD). Every other key is copied under its own name.
- ``bk-small``: ``bk-base`` without the mid block (``mid_block_type=None``).
- ``bk-tiny``: ``bk-small`` without the innermost stage (``block_out_channels[:-1]``); student
  ``up_blocks.j`` <- teacher ``up_blocks.j+1``. It needs the two innermost stages to have the
  same width, as SD's (1280, 1280) do.

A-SDM (Zhu et al., arXiv 2312.15516) has no public code; its ``asdm`` plan here is our
reconstruction: the blocks it removes are BK-SDM-Small's (the candidates the spec names), and
two of its components are added by :func:`prune` as options (``ASDMOptions``):
CLME-CondConv (:mod:`genforge.sd.condconv`) at each stage's first kept ResNet, its experts
initialised from the removed ResNets' convolutions, and GRI attention
(:mod:`genforge.sd.gri`) in the self-attention of the first two stages (64x64 and 32x32
latents in SD). Which conv hosts the CondConv, the expert set and the GRI stages are our
choices, exposed as options.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, fields

import torch
from diffusers import UNet2DConditionModel

__all__ = ["PLANS", "PlanError", "ASDMOptions", "student_config", "weight_map",
           "condconv_experts", "feature_layers", "prune"]

PLANS = ("bk-base", "bk-small", "bk-tiny", "asdm")

# Config entries that diffusers reads per down stage when given as a list; bk-tiny drops the innermost one.
_PER_DOWN_STAGE = ("block_out_channels", "down_block_types", "attention_head_dim", "num_attention_heads",
                   "cross_attention_dim", "transformer_layers_per_block", "only_cross_attention")
_PER_UP_STAGE = ("up_block_types", "reverse_transformer_layers_per_block")


class PlanError(ValueError):
    """A pruning plan does not fit the UNet it is applied to."""


@dataclass(frozen=True)
class ASDMOptions:
    """The A-SDM components added by the ``asdm`` plan (all our choices; the paper gives no values).

    - ``condconv``: CLME-CondConv at ``down_blocks.i.resnets.0.conv2`` and
      ``up_blocks.j.resnets.0.conv2`` of every stage that lost a ResNet; experts = that conv
      and the removed ResNets' convs of the same shape. ``condconv_routing``: ``softmax``
      (experts mixed convexly) or ``sigmoid`` (CondConv's original); ``condconv_kept_share``:
      the routing prior of the kept conv at initialisation (the rest shared by the others).
    - ``gri``: GRI attention in the self-attention of ``gri_stages`` (None: those of stages 0
      and 1 that have attention); ``gri_window`` local window and ``gri_pool`` K/V pooling, in
      latent tokens; ``gri_local_weight`` the weight of the local branch in the fused output.
    """

    condconv: bool = True
    condconv_routing: str = "softmax"
    condconv_kept_share: float = 0.8
    gri: bool = True
    gri_stages: tuple[int, ...] | None = None
    gri_window: int = 8
    gri_pool: int = 4
    gri_local_weight: float = 0.5

    @classmethod
    def from_value(cls, value: "ASDMOptions | dict | None") -> "ASDMOptions":
        """Options from a mapping (unknown keys are an error) or None (the defaults)."""
        if value is None or isinstance(value, cls):
            return value or cls()
        if not isinstance(value, dict):
            raise PlanError(f"asdm options must be an ASDMOptions or a mapping, got {type(value).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise PlanError(f"unknown asdm option(s) {unknown}; expected some of {known}")
        if value.get("gri_stages") is not None:
            value = {**value, "gri_stages": tuple(value["gri_stages"])}
        return cls(**value)


def _check_plan(config, plan: str) -> None:
    """Raise PlanError if ``plan`` cannot be applied to a UNet with this config, before any work."""
    if plan not in PLANS:
        raise PlanError(f"unknown pruning plan {plan!r}; expected one of {list(PLANS)}")
    layers = config["layers_per_block"]
    if not isinstance(layers, int) or layers < 2:
        raise PlanError(f"plan {plan!r} keeps 1 of layers_per_block layers per down stage, so it needs an integer "
                        f"layers_per_block >= 2; this UNet has layers_per_block={layers!r}")
    if plan != "bk-base" and config["mid_block_type"] is None:
        raise PlanError(f"plan {plan!r} removes the mid block, but this UNet has mid_block_type=None")
    if plan == "bk-tiny":
        widths = list(config["block_out_channels"])
        if len(widths) < 3 or widths[-1] != widths[-2]:
            raise PlanError(f"plan 'bk-tiny' drops the innermost stage, so it needs >= 3 stages whose two innermost "
                            f"have equal widths (SD: 1280, 1280); this UNet has block_out_channels={widths}")


def student_config(teacher_config, plan: str) -> dict:
    """The student's ``UNet2DConditionModel`` config (BK-SDM: a student is only a config)."""
    _check_plan(teacher_config, plan)
    config = {k: copy.deepcopy(v) for k, v in dict(teacher_config).items() if not k.startswith("_")}
    config["layers_per_block"] = 1
    if plan != "bk-base":
        config["mid_block_type"] = None
    if plan == "bk-tiny":
        for key in _PER_DOWN_STAGE:
            if isinstance(config.get(key), (list, tuple)):
                config[key] = list(config[key])[:-1]
        for key in _PER_UP_STAGE:
            if isinstance(config.get(key), (list, tuple)):
                config[key] = list(config[key])[1:]
    return config


_UP_LAYER = re.compile(r"^up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)$")
_UP_OTHER = re.compile(r"^up_blocks\.(\d+)\.(.*)$")


def _teacher_key(key: str, layers: int, up_shift: int) -> str:
    """BK-SDM's copy rule for one student key: up layer 1 <- teacher layer ``layers``, up blocks shifted."""
    match = _UP_LAYER.match(key)
    if match:
        block, kind, index, rest = match.groups()
        index = 0 if index == "0" else layers
        return f"up_blocks.{int(block) + up_shift}.{kind}.{index}.{rest}"
    match = _UP_OTHER.match(key)
    if match:
        return f"up_blocks.{int(match.group(1)) + up_shift}.{match.group(2)}"
    return key


def weight_map(teacher: UNet2DConditionModel, student: UNet2DConditionModel, plan: str) -> dict[str, str]:
    """{student state-dict key: teacher key} for every key of a plain (BK) student; PlanError unless each
    teacher key exists and has the student key's shape."""
    base = "bk-small" if plan == "asdm" else plan
    up_shift = 1 if base == "bk-tiny" else 0
    teacher_sd, student_sd = teacher.state_dict(), student.state_dict()
    mapping, bad = {}, []
    for key, value in student_sd.items():
        source = _teacher_key(key, teacher.config.layers_per_block, up_shift)
        if source not in teacher_sd or teacher_sd[source].shape != value.shape:
            found = tuple(teacher_sd[source].shape) if source in teacher_sd else "missing"
            bad.append(f"{key} {tuple(value.shape)} <- {source} {found}")
        mapping[key] = source
    if bad:
        raise PlanError(f"plan {plan!r} does not fit this UNet: {len(bad)} student keys have no same-shape teacher "
                        f"key, e.g. {bad[:3]}")
    return mapping


def condconv_experts(teacher: UNet2DConditionModel) -> dict[str, list[str]]:
    """{CondConv site in the student: teacher conv module names of its experts} (our choice, see ASDMOptions).

    Site = ``resnets.0.conv2`` of each down block and each up block; experts = the teacher's conv at the
    site, then the convs of the ResNets the plan removes from that block (indices 1..L-1) that have the
    same weight shape (down: conv1 and conv2; up: conv2, as conv1 there reads the skip concatenation).
    """
    layers = teacher.config.layers_per_block
    sites = {}
    for path, blocks in (("down_blocks", teacher.down_blocks), ("up_blocks", teacher.up_blocks)):
        for i, block in enumerate(blocks):
            kept = block.resnets[0].conv2
            experts = [f"{path}.{i}.resnets.0.conv2"]
            for r in range(1, layers):
                for name in ("conv1", "conv2"):
                    conv = getattr(block.resnets[r], name)
                    if conv.weight.shape == kept.weight.shape:
                        experts.append(f"{path}.{i}.resnets.{r}.{name}")
            if len(experts) > 1:
                sites[f"{path}.{i}.resnets.0.conv2"] = experts
    return sites


def feature_layers(teacher_config, plan: str) -> list[tuple[str, str]]:
    """(teacher module, student module) pairs whose outputs BK-SDM's feature loss matches.

    base/small (and asdm): the outputs of every ``down_blocks.i`` and ``up_blocks.j``, same names.
    tiny: the official mapped names; the last kept down stage loses its downsampler, so its last
    attention's ``proj_out`` (teacher layer L-1, student layer 0) is matched instead.
    """
    n = len(teacher_config["block_out_channels"])
    if plan != "bk-tiny":
        return [(f"down_blocks.{i}", f"down_blocks.{i}") for i in range(n)] + \
               [(f"up_blocks.{j}", f"up_blocks.{j}") for j in range(n)]
    last = n - 2
    layers = teacher_config["layers_per_block"]
    kind = "attentions" if "CrossAttn" in teacher_config["down_block_types"][last] else "resnets"
    suffix = ".proj_out" if kind == "attentions" else ""
    pairs = [(f"down_blocks.{i}", f"down_blocks.{i}") for i in range(last)]
    pairs.append((f"down_blocks.{last}.{kind}.{layers - 1}{suffix}", f"down_blocks.{last}.{kind}.0{suffix}"))
    return pairs + [(f"up_blocks.{j + 1}", f"up_blocks.{j}") for j in range(n - 1)]


def _gri_stages(teacher: UNet2DConditionModel, stages) -> list[int]:
    with_attention = [i for i, block in enumerate(teacher.down_blocks) if getattr(block, "attentions", None)]
    if stages is None:
        return [i for i in (0, 1) if i in with_attention]
    missing = [i for i in stages if i not in with_attention]
    if missing:
        raise PlanError(f"gri_stages {list(stages)} include stage(s) {missing} without attention; stages with "
                        f"attention: {with_attention}")
    return sorted(stages)


def prune(unet: UNet2DConditionModel, plan: str = "bk-small", asdm: ASDMOptions | dict | None = None):
    """The student UNet of ``plan`` with its weights inherited from ``unet`` (the teacher, left untouched).

    BK plans and ``asdm`` with both components off give a stock ``UNet2DConditionModel``; ``asdm`` with
    a component gives an :class:`~genforge.sd.unet.ASDMUNet2DConditionModel` (a subclass that rebuilds
    its CondConvs and GRI processors from its config, so ``save_pretrained``/``from_pretrained`` work).
    """
    from genforge.sd.unet import ASDMUNet2DConditionModel

    if not isinstance(unet, UNet2DConditionModel):
        raise PlanError(f"prune expects a diffusers UNet2DConditionModel, got {type(unet).__name__}")
    if plan != "asdm" and asdm is not None:
        raise PlanError(f"asdm options are only used by plan 'asdm', not {plan!r}")
    config = student_config(unet.config, plan)
    options = ASDMOptions.from_value(asdm) if plan == "asdm" else ASDMOptions(condconv=False, gri=False)
    extra = {}
    if options.condconv:
        extra.update(condconv_sites={site: len(names) for site, names in condconv_experts(unet).items()},
                     condconv_routing=options.condconv_routing)
    if options.gri:
        extra.update(gri_stages=_gri_stages(unet, options.gri_stages), gri_window=options.gri_window,
                     gri_pool=options.gri_pool, gri_local_weight=options.gri_local_weight)
    with torch.device("meta"):
        plain = UNet2DConditionModel(**config)
        student = (ASDMUNet2DConditionModel if extra else UNet2DConditionModel)(**config, **extra)
    mapping = weight_map(unet, plain, plan)
    # Every student tensor is inherited below except CondConv routers, so allocate without initialising.
    student = student.to_empty(device=unet.device)
    if student.dtype != unet.dtype:
        student = student.to(dtype=unet.dtype)
    teacher_sd = unet.state_dict()
    state = {key: teacher_sd[source] for key, source in mapping.items()}
    experts_of = condconv_experts(unet) if options.condconv else {}
    for site in experts_of:
        state.pop(f"{site}.weight")
        state.pop(f"{site}.bias")
    missing, unexpected = student.load_state_dict(state, strict=False)
    teacher_modules = dict(unet.named_modules())
    for site, names in experts_of.items():
        module = student.get_submodule(site)
        module.route.reset_parameters()
        module.inherit([teacher_modules[name] for name in names], kept_share=options.condconv_kept_share)
    new = [k for k in missing if not any(k.startswith(f"{site}.") for site in experts_of)]
    if new or unexpected or any(True for _ in student.buffers()):
        raise PlanError(f"plan {plan!r}: student keys not inherited {new[:3]}, teacher keys unused {unexpected[:3]}")
    return student

