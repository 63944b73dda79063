"""RevCol: reversible column networks.

Cai et al., "Reversible Column Networks", ICLR 2023, arXiv 2212.11696, following the official
classification code of megvii-research/RevCol (``models/revcol.py``, ``revcol_function.py``,
``modules.py``). Implemented here:

- The multi-level reversible unit (Sec. 2). N columns, each a 4-level ConvNeXt-like subnet;
  level l of column i is::

      X_l^i = F_l(X_{l-1}^i, X_{l+1}^{i-1}) + gamma_l * X_l^{i-1}            (forward)
      X_l^{i-1} = gamma_l^{-1} * (X_l^i - F_l(X_{l-1}^i, X_{l+1}^{i-1}))     (inverse)

  with X_{-1}^i the stem output and gamma_l a learnable per-channel scale (init 0.5) whose
  absolute value is clamped to >= 1e-3 before every forward, so the inverse exists. The
  inverse runs top level first: X_3^{i-1} needs only column i, and each reconstructed level
  is the upper input of the level below.
- F_l = ConvNeXt blocks o fusion. The fusion adds the same column's lower level (2x2
  stride-2 conv + LN; the stem output as is at level 0) and the previous column's higher
  level (1x1 projection + LN, nearest-neighbour 2x upsampling; none at level 3 or in the
  first column, which has no previous column and so no gamma either).
- Reversible backpropagation: with ``save_memory=True`` a column is a custom autograd
  Function that keeps only its four outputs, recomputes each F_l in backward and rebuilds the
  previous column's levels with the inverse above, so activations inside the columns are
  never stored. The RNG state before each level is replayed so drop-path masks match.
  ``save_memory=False`` uses plain autograd (and then ``set_grad_checkpointing`` checkpoints
  each column). The reversible Function exists only in eager PyTorch: a TorchScript-scripted
  or FX-traced RevCol computes the same outputs and gradients with plain autograd.
- Intermediate supervision (Sec. 2.3, ``inter_supv=True``): every N/4-th column's top level
  feeds an auxiliary classifier and all but the last a reconstruction decoder;
  :meth:`RevCol.forward_intermediate_supervision` returns their outputs and
  :func:`intermediate_supervision_loss` the compound loss. Only the last column feeds the
  classification head in :meth:`RevCol.forward`.
"""

import re

import torch
import torch.nn.functional as F
from timm.layers import (LayerNorm, LayerNorm2d, NormMlpClassifierHead, calculate_drop_path_rates,
                         register_notrace_function, trunc_normal_)
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models._features import feature_take_indices
from timm.models.convnext import ConvNeXtBlock
from torch import nn
from torch.utils.checkpoint import checkpoint, get_device_states, set_device_states

from genforge.backbones.registry import register_gf_model, register_official_converter

__all__ = ["Column", "Fusion", "Level", "ReconstructionDecoder", "RevCol", "intermediate_supervision_loss"]

GAMMA_MIN = 1e-3  # the official clamp on |gamma|, which keeps every column invertible
NUM_LEVELS = 4


class UpProjection(nn.Module):
    """X_{l+1}^{i-1} -> the fusion's upper term: 1x1 projection, LN, nearest 2x upsampling."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm = LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.proj(x.permute(0, 2, 3, 1)))
        return F.interpolate(x.permute(0, 3, 1, 2), scale_factor=2., mode='nearest')


class Fusion(nn.Module):
    """Inputs of F_l: down(X_{l-1}^i) + up(X_{l+1}^{i-1}), the up term absent at the top and in column 0."""

    def __init__(self, level: int, dims: tuple[int, ...], first_column: bool):
        super().__init__()
        self.down = nn.Sequential(
            nn.Conv2d(dims[level - 1], dims[level], kernel_size=2, stride=2),  # (B, C_{l-1}, 2h, 2w) -> (B, C_l, h, w)
            LayerNorm2d(dims[level]),
        ) if level > 0 else nn.Identity()
        has_up = not first_column and level < NUM_LEVELS - 1
        self.up = UpProjection(dims[level + 1], dims[level]) if has_up else None

    def forward(self, lower: torch.Tensor, upper: torch.Tensor | None) -> torch.Tensor:
        x = self.down(lower)
        if self.up is None:
            return x
        assert upper is not None, "a fusion with an up path needs the previous column's upper level"
        return self.up(upper) + x


class Level(nn.Module):
    """F_l: the fusion followed by ConvNeXt blocks (3x3 depthwise kernels in the paper configs)."""

    def __init__(self, level: int, dims: tuple[int, ...], depth: int, kernel_size: int, first_column: bool,
                 drop_path_rates: list[float]):
        super().__init__()
        self.fusion = Fusion(level, dims, first_column)
        self.blocks = nn.Sequential(*[
            ConvNeXtBlock(dims[level], kernel_size=kernel_size, ls_init_value=1e-6, drop_path=rate)
            for rate in drop_path_rates[:depth]])

    def forward(self, lower: torch.Tensor, upper: torch.Tensor | None) -> torch.Tensor:
        return self.blocks(self.fusion(lower, upper))


class _RngState:
    """The CPU and accelerator RNG states before a level, so its recomputation draws the same masks."""

    def __init__(self, *tensors: torch.Tensor):
        self.cpu = torch.get_rng_state()
        self.devices, self.device_states = get_device_states(*tensors)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        set_device_states(self.devices, self.device_states)


class _ReversibleColumn(torch.autograd.Function):
    """A column whose backward rebuilds, rather than stores, what it needs.

    Forward runs the column without a graph and saves only x and its outputs X^i. Backward
    walks the levels top-down: recompute F_l with grad (drop-path RNG replayed), backprop the
    total gradient of X_l^i through it, then rebuild X_l^{i-1} = (X_l^i - F_l) / gamma_l, which
    is the upper input of level l-1 and gives gamma_l's gradient. Parameters are inputs of the
    Function, so their gradients are returned like any other (``torch.autograd.grad`` works).
    """

    @staticmethod
    def forward(ctx, column: "Column", x: torch.Tensor, *prev_and_params):
        prev = prev_and_params[:NUM_LEVELS]
        ctx.column = column
        ctx.rng_states = []
        device_type = x.device.type
        ctx.autocast = dict(device_type=device_type, enabled=torch.is_autocast_enabled(device_type),
                            dtype=torch.get_autocast_dtype(device_type),
                            cache_enabled=torch.is_autocast_cache_enabled())
        # the RNG state before each level, recorded as the level starts
        hooks = [level.register_forward_pre_hook(lambda *_: ctx.rng_states.append(_RngState(x)))
                 for level in column.levels]
        try:
            states = tuple(column(x, None if prev[0] is None else list(prev)))
        finally:
            for hook in hooks:
                hook.remove()
        ctx.save_for_backward(x, *states)
        return states

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        column: "Column" = ctx.column
        x, *states = ctx.saved_tensors
        params = list(column.parameters())
        position = {id(p): i for i, p in enumerate(params)}
        d_params: list[torch.Tensor | None] = [None] * len(params)
        d_prev: list[torch.Tensor | None] = [None] * NUM_LEVELS
        from_above = None  # dL/dX_l^i arriving through level l+1's down path
        upper = None  # X_{l+1}^{i-1}, rebuilt at the previous step
        with torch.enable_grad(), torch.random.fork_rng(devices=ctx.rng_states[0].devices), \
                torch.autocast(**ctx.autocast):
            for level in reversed(range(NUM_LEVELS)):
                grad = grads[level] if from_above is None else grads[level] + from_above
                lower = (x if level == 0 else states[level - 1]).detach().requires_grad_()
                upper_in = None if upper is None else upper.detach().requires_grad_()
                weights = [p for p in column.levels[level].parameters() if p.requires_grad]
                ctx.rng_states[level].restore()
                residual = column.levels[level](lower, upper_in)
                inputs = [lower] + ([] if upper_in is None else [upper_in]) + weights
                d_inputs = torch.autograd.grad(residual, inputs, grad, allow_unused=True)
                from_above, d_inputs = d_inputs[0], d_inputs[1:]
                if upper_in is not None:
                    d_prev[level + 1] = d_prev[level + 1] + d_inputs[0]
                    d_inputs = d_inputs[1:]
                for p, d in zip(weights, d_inputs):
                    d_params[position[id(p)]] = d
                if column.gamma is not None:
                    gamma = column.gamma[level]
                    with torch.no_grad():
                        upper = column.unmix(level, states[level], residual)
                        d_prev[level] = grad * gamma
                        d_params[position[id(gamma)]] = (grad * upper).sum((0, 2, 3), keepdim=True).to(gamma.dtype)
        return (None, from_above, *d_prev, *d_params)


class Column(nn.Module):
    """One column: four levels, each X_l^i = F_l(X_{l-1}^i, X_{l+1}^{i-1}) + gamma_l * X_l^{i-1}."""

    def __init__(self, dims: tuple[int, ...], depths: tuple[int, ...], kernel_size: int, first: bool,
                 drop_path_rates: list[list[float]]):
        super().__init__()
        self.levels = nn.ModuleList([
            Level(level, dims, depths[level], kernel_size, first, drop_path_rates[level])
            for level in range(NUM_LEVELS)])
        # gamma_l, (1, C_l, 1, 1): the first column adds nothing from a previous one, so it has none.
        self.gamma = None if first else nn.ParameterList([
            nn.Parameter(torch.full((1, dim, 1, 1), 0.5)) for dim in dims])
        self.gamma_min = GAMMA_MIN  # an attribute, which TorchScript reads (it cannot read module globals)

    def clamp_gamma_(self) -> None:
        """|gamma| >= 1e-3 with its sign kept (zero counts as positive), as the official code does each forward.

        Written through ``.data`` like the official code, so it does not invalidate graphs that
        saved gamma; it only ever changes a gamma an optimiser pushed below the bound.
        """
        if self.gamma is not None:
            for gamma in self.gamma:
                sign = torch.where(gamma.data < 0, -1.0, 1.0)
                gamma.data.copy_(sign * gamma.data.abs().clamp(min=self.gamma_min))

    def forward(self, x: torch.Tensor, prev: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """[X_0^i .. X_3^i] from the stem output x and the previous column (None for column 0)."""
        states: list[torch.Tensor] = []
        lower = x
        if self.gamma is None or prev is None:
            for block in self.levels:
                lower = block(lower, None)
                states.append(lower)
        else:
            for level, (block, gamma) in enumerate(zip(self.levels, self.gamma)):
                upper = None if level == len(self.levels) - 1 else prev[level + 1]
                lower = block(lower, upper) + gamma * prev[level]
                states.append(lower)
        return states

    def run(self, x: torch.Tensor, prev: list[torch.Tensor] | None, save_memory: bool,
            grad_checkpointing: bool) -> list[torch.Tensor]:
        """The column as the network runs it: gamma clamped, then reversible (``save_memory``),
        checkpointed or plain autograd when gradients are recorded in eager PyTorch; plain
        autograd when scripted or traced."""
        self.clamp_gamma_()
        if not torch.jit.is_scripting():
            if torch.is_grad_enabled() and not isinstance(x, torch.fx.Proxy):
                if save_memory:
                    return self.forward_reversible(x, prev)
                if grad_checkpointing:
                    return checkpoint(self, x, prev, use_reentrant=False)
        return self.forward(x, prev)

    @torch.jit.unused
    def forward_reversible(self, x: torch.Tensor, prev: list[torch.Tensor] | None) -> list[torch.Tensor]:
        """Same outputs as :meth:`forward`; backward recomputes instead of storing activations."""
        prev = [None] * NUM_LEVELS if prev is None else prev
        return list(_ReversibleColumn.apply(self, x, *prev, *self.parameters()))

    def unmix(self, level: int, state: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """X_l^{i-1} = gamma_l^{-1} (X_l^i - F_l(...)): the previous column's level from this one's."""
        return (state - residual) / self.gamma[level]

    def invert(self, x: torch.Tensor, states: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The previous column's levels (X_0^{i-1} .. X_3^{i-1}) from this column's, top level first."""
        if self.gamma is None:
            raise ValueError("the first column has no previous column to reconstruct")
        prev: list[torch.Tensor | None] = [None] * NUM_LEVELS
        for level in reversed(range(NUM_LEVELS)):
            lower = x if level == 0 else states[level - 1]
            upper = None if level == NUM_LEVELS - 1 else prev[level + 1]
            prev[level] = self.unmix(level, states[level], self.levels[level](lower, upper))
        return tuple(prev)


class ReconstructionDecoder(nn.Module):
    """Auxiliary decoder of intermediate supervision: X_3^i -> image logits at input resolution.

    Three times (1x1 conv + LN + GELU, bilinear 2x up, one ConvNeXt block of MLP ratio 1), then a
    1x1 conv to 16 * in_chans channels and a 4x pixel shuffle.
    """

    def __init__(self, dims: tuple[int, ...], out_chans: int = 3):
        super().__init__()
        dims = tuple(reversed(dims))  # top level first, e.g. (512, 256, 128, 64)
        self.proj_layers = nn.ModuleList([
            nn.Sequential(nn.Conv2d(d_in, d_out, 1), LayerNorm2d(d_out), nn.GELU())
            for d_in, d_out in zip(dims[:-1], dims[1:])])
        self.normal_layers = nn.ModuleList([
            nn.Sequential(ConvNeXtBlock(d, kernel_size=3, mlp_ratio=1, ls_init_value=1e-6)) for d in dims[1:]])
        self.projback = nn.Sequential(nn.Conv2d(dims[-1], 4 ** 2 * out_chans, 1), nn.PixelShuffle(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for proj, blocks in zip(self.proj_layers, self.normal_layers):
            x = blocks(F.interpolate(proj(x), scale_factor=2, mode='bilinear', align_corners=True))
        return self.projback(x)  # (B, C_0, H/4, W/4) -> (B, in_chans, H, W)


@register_notrace_function  # reason: checks the input size, a Proxy under FX
def check_input_size(x: torch.Tensor) -> torch.Tensor:
    """``x`` unchanged if its height and width are multiples of 32, else a ValueError naming its shape."""
    if x.shape[-1] % 32 != 0 or x.shape[-2] % 32 != 0:
        raise ValueError(f"RevCol needs height and width divisible by 32 (levels at strides 4-32 are "
                         f"fused by 2x up/down sampling); got input of shape {x.shape}")
    return x


class RevCol(nn.Module):
    """Reversible column network: stem, N columns, LN + linear head on the last column's top level."""

    def __init__(
            self,
            dims: tuple[int, ...] = (64, 128, 256, 512),
            depths: tuple[int, ...] = (2, 2, 4, 2),
            num_columns: int = 4,
            kernel_size: int = 3,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            save_memory: bool = True,
            inter_supv: bool = False,
    ):
        """``save_memory``: reversible backward (the official ``save_memory``/``SAVEMM`` option) instead
        of plain autograd. ``inter_supv``: build the auxiliary classifiers and decoders of intermediate
        supervision (needs a multiple of 4 columns). Drop-path rates rise linearly over one column's
        blocks and repeat in every column, as in the official code."""
        super().__init__()
        if len(dims) != NUM_LEVELS or len(depths) != NUM_LEVELS:
            raise ValueError(f"RevCol has {NUM_LEVELS} levels; got dims={dims}, depths={depths}")
        if inter_supv and num_columns % 4:
            raise ValueError(f"intermediate supervision taps every num_columns/4-th column; "
                             f"num_columns={num_columns} is not a multiple of 4")
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = dims[-1]
        self.save_memory = save_memory
        self.inter_supv = inter_supv
        self.grad_checkpointing = False

        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4),  # (B, in_chans, H, W) -> (B, C_0, H/4, W/4)
            LayerNorm2d(dims[0]),
        )
        rates = calculate_drop_path_rates(drop_path_rate, sum(depths))
        rates = [rates[sum(depths[:level]):sum(depths[:level + 1])] for level in range(NUM_LEVELS)]
        self.columns = nn.ModuleList([
            Column(tuple(dims), tuple(depths), kernel_size, first=i == 0, drop_path_rates=rates)
            for i in range(num_columns)])
        self.feature_info = [dict(num_chs=dims[level], reduction=4 * 2 ** level,
                                  module=f'columns.{num_columns - 1}.levels.{level}') for level in range(NUM_LEVELS)]
        self.head = NormMlpClassifierHead(dims[-1], num_classes, pool_type=global_pool, drop_rate=drop_rate)

        # Intermediate supervision: taps after columns N/4-1, 2N/4-1, 3N/4-1 (the last one is the head).
        self.aux_columns = [(k + 1) * (num_columns // 4) - 1 for k in range(3)] if inter_supv else []
        self.cls_blocks = nn.ModuleList([
            NormMlpClassifierHead(dims[-1], num_classes, pool_type=global_pool) for _ in self.aux_columns
        ]) if inter_supv else None
        self.decoder_blocks = nn.ModuleList([
            ReconstructionDecoder(tuple(dims), out_chans=in_chans) for _ in self.aux_columns
        ]) if inter_supv else None
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            trunc_normal_(module.weight, std=.02)
            nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Nothing beyond timm's default of 1-D tensors: the official recipe decays gamma (1, C, 1, 1) too."""
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r'^stem', blocks=r'^columns\.(\d+)' if coarse else [
            (r'^columns\.(\d+)\.levels\.(\d+)', None), (r'^columns\.(\d+)\.gamma', (0,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint each column in plain-autograd mode.

        In reversible mode (``save_memory=True``) this changes nothing: a reversible column already
        keeps only its outputs and recomputes its insides in backward, which is what checkpointing
        a column would do, so checkpointing on top would only recompute twice.
        """
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None, reset_other: bool = False) -> None:
        """New final head, and new auxiliary classifiers for the same classes if there are any."""
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, reset_other=reset_other)
        for head in self.cls_blocks or ():
            head.reset(num_classes, global_pool, reset_other=reset_other)

    def _last_column(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(check_input_size(x))
        states: list[torch.Tensor] | None = None
        for column in self.columns:
            states = column.run(x, states, self.save_memory, self.grad_checkpointing)
        assert states is not None, "RevCol has at least one column"
        return states

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._last_column(x)[-1]  # X_3^{N-1}, (B, C_3, H/32, W/32)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = 'NCHW', intermediates_only: bool = False):
        """The last column's levels X_l^{N-1} (strides 4, 8, 16, 32).

        ``norm`` and ``stop_early`` change nothing: there is no norm between the columns and the head,
        and every level of the earlier columns feeds the last column's lower levels.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, _ = feature_take_indices(NUM_LEVELS, indices)
        states = self._last_column(x)
        intermediates = [states[i] for i in take_indices]
        return intermediates if intermediates_only else (states[-1], intermediates)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the head and the auxiliary modules; the columns stay whole (see forward_intermediates)."""
        take_indices, _ = feature_take_indices(NUM_LEVELS, indices)
        if prune_head:
            self.cls_blocks = self.decoder_blocks = None
            self.aux_columns = []
            self.inter_supv = False
            self.reset_classifier(0, '', reset_other=True)
        return take_indices

    def forward_intermediate_supervision(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Outputs for the intermediate-supervision loss, as the official training forward returns them.

        Returns ``(logits, reconstructions)``: logits of the auxiliary classifiers on X_3 of columns
        N/4-1, 2N/4-1, 3N/4-1 followed by the head's logits on the last column (4 in all), and the
        three decoders' image logits (B, in_chans, H, W) from the same auxiliary columns. Feed them to
        :func:`intermediate_supervision_loss`; ``forward`` gives the last entry of ``logits``.
        """
        if not self.inter_supv:
            raise ValueError("this RevCol was built without inter_supv=True, so it has no auxiliary heads")
        x = self.stem(check_input_size(x))
        logits, reconstructions = [], []
        states = None
        for i, column in enumerate(self.columns):
            states = column.run(x, states, self.save_memory, self.grad_checkpointing)
            if i in self.aux_columns:
                k = self.aux_columns.index(i)
                logits.append(self.cls_blocks[k](states[-1]))
                reconstructions.append(self.decoder_blocks[k](states[-1]))
        logits.append(self.forward_head(states[-1]))
        return logits, reconstructions


def intermediate_supervision_loss(logits: list[torch.Tensor], reconstructions: list[torch.Tensor],
                                  image: torch.Tensor, target: torch.Tensor, recon_weight: float = 3.0,
                                  cls_weight: float = 0.7, criterion=F.cross_entropy) -> torch.Tensor:
    """The compound loss of intermediate supervision (official ``loss.py``; weights of the T/S/B configs).

    With n = len(reconstructions) auxiliary taps and m = len(logits) = n + 1::

        L = CE(logits[-1]) + sum_k [ BCE(recon_k, image) (1 - k/n) recon_weight
                                     + CE(logits[k]) (k+1)/m cls_weight ]

    so early columns weigh reconstruction more and classification less. ``image`` is the input
    image in [0, 1] (undo the mean/std normalisation first), clamped to [0.01, 0.99] as the BCE
    target; ``target`` is whatever ``criterion`` takes (class indices, or soft labels after mixup).
    """
    if len(logits) != len(reconstructions) + 1:
        raise ValueError(f"expected one more logits tensor than reconstructions (the final head); "
                         f"got {len(logits)} logits and {len(reconstructions)} reconstructions")
    image = image.clamp(0.01, 0.99)
    n, m = len(reconstructions), len(logits)
    loss = criterion(logits[-1], target)
    for k, recon in enumerate(reconstructions):
        loss = loss + F.binary_cross_entropy_with_logits(recon, image) * (1 - k / n) * recon_weight
        loss = loss + criterion(logits[k], target) * (k + 1) / m * cls_weight
    return loss


_OFFICIAL_RENAMES = (
    (r'^subnet(\d+)\.alpha(\d)$', r'columns.\1.gamma.\2'),
    (r'^subnet(\d+)\.level(\d)\.', r'columns.\1.levels.\2.'),
    (r'\.up\.channel_reschedule\.0\.', '.up.proj.'),
    (r'\.up\.channel_reschedule\.1\.', '.up.norm.'),
    (r'\.dwconv\.', '.conv_dw.'),
    (r'\.pwconv1\.', '.mlp.fc1.'),
    (r'\.pwconv2\.', '.mlp.fc2.'),
    (r'^(cls|cls_blocks\.3)\.classifier\.', 'head.classifier.'),
    (r'\.classifier\.0\.', '.norm.'),
    (r'\.classifier\.1\.', '.fc.'),
)


@register_official_converter("gf_revcol")
def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: RevCol) -> dict[str, torch.Tensor]:
    """Official ``FullNet`` keys -> ours, by renaming (our own layout passes through).

    ``subnetI.alphaL`` -> ``columns.I.gamma.L``; ``dwconv/pwconv1/pwconv2`` -> timm's
    ``conv_dw/mlp.fc1/mlp.fc2``; ``fusion.up.channel_reschedule.{0,1}`` -> ``fusion.up.{proj,norm}``;
    the classifier of the last column (``cls_blocks.3``, or ``cls`` without intermediate
    supervision) -> ``head.{norm,fc}``. Dropped: ``subnet0.alpha*`` (they scale the zero state before
    the first column, so never change the output) and, when ``model`` was built without
    ``inter_supv``, the auxiliary ``cls_blocks.0-2`` and ``decoder_blocks``.
    """
    state_dict = state_dict.get('model', state_dict)
    if any(k.startswith('columns.') for k in state_dict):
        return state_dict
    out = {}
    for key, value in state_dict.items():
        if re.match(r'^subnet0\.alpha\d$', key):
            continue
        if not model.inter_supv and re.match(r'^(cls_blocks\.[0-2]|decoder_blocks)\.', key):
            continue
        for pattern, replacement in _OFFICIAL_RENAMES:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


def _create(variant: str, pretrained: bool = False, **kwargs) -> RevCol:
    # Columns are not a sequential chain of modules, so features come from forward_intermediates.
    return build_model_with_cfg(RevCol, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls='getter'), **kwargs)


def _cfg(**kwargs) -> dict:
    return {**dict(num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
                   interpolation='bicubic', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                   first_conv='stem.0', classifier='head.fc', paper_ids='arXiv:2212.11696', license='apache-2.0'),
            **kwargs}


default_cfgs = generate_default_cfgs({
    'gf_revcol_tiny.untrained': _cfg(),
    'gf_revcol_small.untrained': _cfg(),
    'gf_revcol_base.untrained': _cfg(),
    'gf_revcol_nano.untrained': _cfg(input_size=(3, 32, 32), pool_size=(1, 1)),
})


@register_gf_model
def gf_revcol_tiny(pretrained: bool = False, **kwargs) -> RevCol:
    """RevCol-T: 4 columns, 30M params, 82.2% ImageNet-1k top-1 (official training drop_path_rate 0.1).

    Official weights: ``load_official('gf_revcol_tiny', 'revcol_tiny_1k.pth')`` (add ``inter_supv=True``
    to keep the auxiliary heads).
    """
    return _create('gf_revcol_tiny', pretrained, dims=(64, 128, 256, 512), depths=(2, 2, 4, 2), num_columns=4,
                   **kwargs)


@register_gf_model
def gf_revcol_small(pretrained: bool = False, **kwargs) -> RevCol:
    """RevCol-S: 8 columns, 60M params, 83.5% ImageNet-1k top-1 (official training drop_path_rate 0.3)."""
    return _create('gf_revcol_small', pretrained, dims=(64, 128, 256, 512), depths=(2, 2, 4, 2), num_columns=8,
                   **kwargs)


@register_gf_model
def gf_revcol_base(pretrained: bool = False, **kwargs) -> RevCol:
    """RevCol-B: 16 columns, 138M params, 84.1% ImageNet-1k top-1 (official training drop_path_rate 0.4)."""
    return _create('gf_revcol_base', pretrained, dims=(72, 144, 288, 576), depths=(1, 1, 3, 2), num_columns=16,
                   **kwargs)


@register_gf_model
def gf_revcol_nano(pretrained: bool = False, **kwargs) -> RevCol:
    """A test-sized RevCol (32x32 input): 4 columns of widths 8-32, one block per level."""
    return _create('gf_revcol_nano', pretrained, dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_columns=4,
                   **kwargs)
