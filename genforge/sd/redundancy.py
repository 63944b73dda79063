"""Which blocks of a UNet are compute-redundant: A-SDM's first step (arXiv 2312.15516), our measure.

A-SDM first finds the compute-redundant blocks of the SD UNet, then prunes them; the paper's
criterion is not public. Ours (in the spirit of LAPTOP-Diff's one-shot output loss, arXiv
2404.11098): for each block (a ResNet with the attention that follows it, or the mid block),

- its share of the UNet's MACs (``torch.utils.flop_counter.FlopCounterMode``, per module) and of
  its forward latency (wall clock between forward pre- and post-hooks),
- the change of the UNet's output when the block is skipped:
  ||eps_skip - eps||^2 / ||eps||^2 on the same inputs.

Skipping a block keeps the UNet's wiring: the ResNet returns its shortcut (the identity, or its
1x1 ``conv_shortcut`` where channels change or the up path concatenates a skip), the attention and
the mid block return their input.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = ["Unit", "units", "skipped", "MacCount", "count_macs", "redundancy_report"]



def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# CPU runs SDPA as an op FlopCounterMode has no formula for; count it with torch's own SDPA formula.
_CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}


@dataclass(frozen=True)
class Unit:
    """A prunable block: a name and the module paths it consists of."""

    name: str
    modules: tuple[str, ...]


def units(unet: nn.Module) -> list[Unit]:
    """Every ResNet(+attention) pair of the down and up paths, and the mid block."""
    found = []
    for path, blocks in (("down", unet.down_blocks), ("up", unet.up_blocks)):
        for i, block in enumerate(blocks):
            for r in range(len(block.resnets)):
                modules = [f"{path}_blocks.{i}.resnets.{r}"]
                if getattr(block, "attentions", None):
                    modules.append(f"{path}_blocks.{i}.attentions.{r}")
                found.append(Unit(f"{path}.{i}.{r}", tuple(modules)))
        if path == "down" and unet.mid_block is not None:
            found.append(Unit("mid", ("mid_block",)))
    return found


def _skip_hook(module, args, kwargs, output):
    """Forward hook that replaces a block's output by what it would be without the block."""
    hidden = args[0] if args else kwargs["hidden_states"] if "hidden_states" in kwargs else kwargs["input_tensor"]
    if hasattr(module, "conv_shortcut") and hasattr(module, "conv2"):  # a ResnetBlock2D
        return module.conv_shortcut(hidden) if module.conv_shortcut is not None else hidden
    if isinstance(output, tuple):  # a Transformer2DModel called with return_dict=False
        return (hidden, *output[1:])
    if hasattr(output, "sample"):
        return type(output)(sample=hidden)
    return hidden


@contextlib.contextmanager
def skipped(unet: nn.Module, unit: Unit):
    """Run ``unet`` with ``unit`` skipped inside the context."""
    handles = [unet.get_submodule(name).register_forward_hook(_skip_hook, with_kwargs=True) for name in unit.modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class MacCount:
    """MACs of one call: in all, in attention scores (softmax(QK^T)V), and per module path."""

    total: int
    attention: int
    per_module: dict[str, int]


def count_macs(fn) -> MacCount:
    """MACs (FLOPs / 2) of ``fn()``; module paths are relative to the root module."""
    with FlopCounterMode(display=False, custom_mapping=_CPU_SDPA) as counter:
        fn()
    counts = counter.get_flop_counts()
    per_module = {name.partition(".")[2] if "." in name else name: sum(ops.values()) // 2
                  for name, ops in counts.items()}
    # Attention scores are SDPA ops, or batched matmuls where SDPA decomposes (on the meta device);
    # a UNet's linear layers and convolutions are never bmm.
    attention = sum(v for op, v in counts["Global"].items() if "attention" in str(op) or str(op) == "aten.bmm") // 2
    return MacCount(counter.get_total_flops() // 2, attention, per_module)


def _unit_latency(unet: nn.Module, unit_list: list[Unit], run) -> dict[str, float]:
    """Seconds spent in each unit's modules during ``run()`` (pre/post forward hooks)."""
    spent = {unit.name: 0.0 for unit in unit_list}
    started = {}
    handles = []
    for unit in unit_list:
        for name in unit.modules:
            module = unet.get_submodule(name)

            def pre(module, args, key=(unit.name, name)):
                started[key] = time.perf_counter()

            def post(module, args, output, key=(unit.name, name)):
                spent[key[0]] += time.perf_counter() - started[key]

            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return spent


@torch.inference_mode()
def redundancy_report(unet: nn.Module, sample, timesteps, encoder_hidden_states, output_change: bool = True,
                      repeats: int = 1) -> list[dict]:
    """One row per unit: MAC share, latency share (over ``repeats`` timed forwards) and, if
    ``output_change``, the relative output change when the unit is skipped (else None)."""
    unit_list = units(unet)

    def run():
        return unet(sample, timesteps, encoder_hidden_states).sample

    reference = run()  # also the warm-up for the timing below
    count = count_macs(run)
    spent = {unit.name: 0.0 for unit in unit_list}
    total_time = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for name, seconds in _unit_latency(unet, unit_list, run).items():
            spent[name] += seconds
        total_time += time.perf_counter() - start
    rows = []
    for unit in unit_list:
        change = None
        if output_change:
            with skipped(unet, unit):
                change = ((run() - reference).pow(2).sum() / reference.pow(2).sum()).item()
        rows.append({"unit": unit.name, "modules": list(unit.modules),
                     "mac_share": sum(count.per_module.get(name, 0) for name in unit.modules) / count.total,
                     "latency_share": spent[unit.name] / total_time, "output_change": change})
    return rows
