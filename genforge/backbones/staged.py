"""The timm model contract for the common backbone shape: ``stem`` -> ``stages`` -> ``head``.

Most families here are a stem (``forward_stem``), a sequence of stages (each may hold a ``downsample`` and
``blocks`` and has a ``grad_checkpointing`` flag) and a timm classifier head
(``ClassifierHead`` or ``NormMlpClassifierHead``). :class:`StagedBackbone` implements timm's
contract once for all of them: ``forward_features`` / ``forward_head`` / ``forward``,
``forward_intermediates`` and ``prune_intermediate_layers`` over the stage outputs,
``get_classifier`` / ``reset_classifier``, ``set_grad_checkpointing`` and a stage-wise
``group_matcher``. A family subclasses it, builds ``stem``, ``stages``, ``head`` and
``feature_info`` in ``__init__``, and overrides only what differs.
"""

import torch
from timm.models._features import feature_take_indices
from torch import nn

__all__ = ["StagedBackbone", "convnext_layout_key"]


class StagedBackbone(nn.Module):
    """Base of ``stem -> stages -> head`` backbones; see the module docstring.

    A subclass sets the modules ``stem``, ``stages`` (``nn.Sequential``) and ``head`` and the
    attributes ``num_classes``, ``num_features``, ``head_hidden_size`` and ``feature_info``.
    (They are not class annotations: under ``from __future__ import annotations`` TorchScript
    cannot resolve an annotation such as ``nn.Module``.)
    """

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Nothing beyond timm's default rule (1-d parameters and biases)."""
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r'^stem', blocks=r'^stages\.(\d+)' if coarse else [
            (r'^stages\.(\d+)\.downsample', (0,)),
            (r'^stages\.(\d+)\.blocks\.(\d+)', None)])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = 'NCHW', intermediates_only: bool = False):
        """Stage outputs ``(B, feature_info[i]['num_chs'], H / r_i, W / r_i)``.

        ``norm`` has no effect: the final norm, where a family has one, is part of the head.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW'; got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages[:max_index + 1] if stop_early else self.stages
        intermediates = []
        x = self.forward_stem(x)
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Keep the stages up to the last wanted one; the head goes (its norm is sized for the last stage)."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_head or prune_end:
            self.num_classes = 0
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
            self.head.reset(0, '', reset_other=True, in_features=self.num_features)
        return take_indices

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """The input to the first stage (families whose stem lives elsewhere override this)."""
        return self.stem(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.forward_stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def convnext_layout_key(key: str) -> str:
    """A key of the ConvNeXt-style official layout (HorNet, UniRepLKNet) renamed to ours.

    ``downsample_layers.0`` -> ``stem``; ``downsample_layers.i`` -> ``stages.i.downsample``;
    ``stages.i.j`` -> ``stages.i.blocks.j``; the final ``norm``/``head`` -> ``head.norm``/``head.fc``.
    """
    parts = key.split('.')
    if parts[0] == 'downsample_layers':
        rest = '.'.join(parts[2:])
        return f'stem.{rest}' if parts[1] == '0' else f'stages.{parts[1]}.downsample.{rest}'
    if parts[0] == 'stages':
        return f'stages.{parts[1]}.blocks.{parts[2]}.' + '.'.join(parts[3:])
    if parts[0] in ('norm', 'head'):
        return f"head.{'norm' if parts[0] == 'norm' else 'fc'}.{parts[1]}"
    return key
