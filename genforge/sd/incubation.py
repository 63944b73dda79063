"""A-SDM's progressive incubation: train student stages inside the frozen teacher, then jointly.

A-SDM (arXiv 2312.15516) recovers quality after pruning with a "progressive incubation
strategy"; the paper body is not public. Our reconstruction follows Deep Incubation (Ni et al.,
ICCV 2023, arXiv 2212.04129, same senior author): split the student into modules, train each
inside the frozen teacher (a hybrid network) against the teacher, then assemble and fine-tune
all. "Progressive" (our choice): module k is trained in a hybrid that already holds the student
modules 0..k-1 trained before it.

Our choice of module: a *stage* i = student ``down_blocks[i]`` together with the mirrored
``up_blocks[n-1-i]``. A down stage emits one skip per layer plus its downsampler's, and the
mirrored up block consumes exactly that many (diffusers pops ``len(resnets)`` skips per up
block), so any set of student stages runs inside the teacher's own forward. The innermost stage
also brings the student's mid block (``None`` for plans that remove it). The teacher's stem,
time embedding and head stay in the hybrid until the joint phase.
"""

from __future__ import annotations

import copy

from torch import nn

__all__ = ["stage_modules", "hybrid", "incubation_phase", "train_only"]


def stage_modules(unet: nn.Module, stage: int) -> list[nn.Module]:
    """The modules of stage ``stage``: down block, mirrored up block, and the mid block for the innermost."""
    n = len(unet.down_blocks)
    if not 0 <= stage < n:
        raise ValueError(f"stage {stage} is out of range for a UNet with {n} stages")
    modules = [unet.down_blocks[stage], unet.up_blocks[n - 1 - stage]]
    if stage == n - 1 and unet.mid_block is not None:
        modules.append(unet.mid_block)
    return modules


def hybrid(teacher: nn.Module, student: nn.Module, stages: list[int]) -> nn.Module:
    """The teacher with the student's ``stages`` swapped in (modules shared with the student, not copied).

    A shallow copy of the teacher: new module containers, same parameters, so training the hybrid
    trains the student's stage modules and leaves the teacher object unchanged."""
    n = len(teacher.down_blocks)
    if len(student.down_blocks) != n:
        raise ValueError(f"incubation needs the student to keep the teacher's {n} stages, it has "
                         f"{len(student.down_blocks)} (plan bk-tiny drops one; use bk-base, bk-small or asdm)")
    mixed = copy.copy(teacher)
    mixed._modules = dict(teacher._modules)
    mixed.down_blocks = nn.ModuleList(list(teacher.down_blocks))
    mixed.up_blocks = nn.ModuleList(list(teacher.up_blocks))
    for stage in stages:
        mixed.down_blocks[stage] = student.down_blocks[stage]
        mixed.up_blocks[n - 1 - stage] = student.up_blocks[n - 1 - stage]
        if stage == n - 1:
            mixed.mid_block = student.mid_block
    return mixed


def incubation_phase(step: int, order: list[int], steps_per_stage: int) -> tuple[int | None, list[int]]:
    """(stage trained at optimizer step ``step``, stages in the hybrid); (None, all) once the joint phase
    starts after ``len(order) * steps_per_stage`` steps."""
    index = step // steps_per_stage if steps_per_stage > 0 else len(order)
    if index >= len(order):
        return None, list(order)
    return order[index], list(order[:index + 1])


def train_only(student: nn.Module, stage: int | None) -> list[nn.Parameter]:
    """Make only ``stage``'s modules of ``student`` trainable (``None``: all of it, the joint phase);
    returns the trainable parameters, so the other stages keep what they learnt."""
    student.requires_grad_(stage is None)
    if stage is not None:
        for module in stage_modules(student, stage):
            module.requires_grad_(True)
    return [p for p in student.parameters() if p.requires_grad]
