"""The redundancy measure A-SDM starts from (arXiv 2312.15516; the criterion is ours)."""

import torch

from genforge.sd.configs import UNET_CONFIGS
from genforge.sd.redundancy import count_macs, redundancy_report, units

SD_LIKE = UNET_CONFIGS["sd-like-tiny"]


def test_a_block_whose_residual_branches_are_zero_changes_nothing_when_skipped(teacher, unet_inputs):
    with torch.no_grad():
        for module in (teacher.down_blocks[0].resnets[1].conv2, teacher.down_blocks[0].attentions[1].proj_out):
            module.weight.zero_()
            module.bias.zero_()
    rows = {row["unit"]: row for row in redundancy_report(teacher, *unet_inputs(SD_LIKE, batch=1))}
    assert len(rows) == len(units(teacher)) == 3 * 2 + 3 * 3 + 1  # down pairs, up pairs, mid
    assert rows["down.0.1"]["output_change"] == 0
    assert all(row["output_change"] > 0 for name, row in rows.items() if name != "down.0.1")
    assert rows["down.0.1"]["mac_share"] == rows["down.0.0"]["mac_share"] > 0
    assert sum(row["mac_share"] for row in rows.values()) < 1  # stem, samplers and head are in no unit


def test_macs_count_attention_scores_on_cpu():
    q = torch.randn(1, 4, 64, 8)  # (B, H, N, D)
    count = count_macs(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert count.attention == count.total == 2 * 64 * 64 * 32  # QK^T and (softmax)V: N*N*(H*D) MACs each
