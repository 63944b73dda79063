"""Knowledge concentration: many vertical specialists distilled into one student.

Gao, Guo, Li, Nevatia, "Knowledge Concentration: Learning 100K Object Classifiers in a
Single CNN", arXiv 1711.07607. Paper-derived (secondary source): no official code exists,
and this clean-room version follows the paper abstract plus a third-party summary; it is to
be checked against the PDF.

What the code implements, in the paper's order:
- Verticals: the class ids 0..N-1 are partitioned into M verticals V_v of N_v classes.
- Multi-teacher targets: the vertical of a sample's label picks the specialist teacher;
  the soft target is z*_c = p_T(c) for c in that vertical and in the teacher's top-K, and
  z*_c = 0 otherwise. The student is trained with sigmoid cross-entropy
  L = -mean_c [z*_c log s(y_c) + (1 - z*_c) log(1 - s(y_c))].
- Structurally connected (SC) layers: per-vertical blocks with no weight across verticals.
  Parameter counts (weights only) with backbone width s_b, N classes, M verticals:
  (a) FC(s1)-FC(s2): s_b*s1 + s1*s2 + s2*N;  (b) FC(s1)-SC(s2): s_b*s1 + s1*s2*M + s2*N.
- Self-paced learning: per vertical a learnable scale gamma_v, initialised at sqrt(N_v);
  the logits of vertical v become y_v = gamma_v * x_v / ||x_v||.
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Verticals:
    """A partition of the class ids 0..N-1 into verticals (disjoint groups covering all ids)."""

    def __init__(self, groups: Sequence[Sequence[int]]):
        groups = [[int(c) for c in g] for g in groups]
        if not groups or any(len(g) == 0 for g in groups):
            raise ValueError(
                f"every vertical needs at least one class, got sizes {[len(g) for g in groups]}"
            )
        flat = [c for g in groups for c in g]
        if len(set(flat)) != len(flat):
            dup = sorted({c for c in flat if flat.count(c) > 1})
            raise ValueError(
                f"verticals must be disjoint, class ids {dup} appear more than once"
            )
        n = len(flat)
        if sorted(flat) != list(range(n)):
            raise ValueError(
                f"verticals must cover class ids 0..{n - 1} exactly, got {sorted(flat)}"
            )
        self.groups: list[list[int]] = groups
        self.num_classes = n
        self.num_verticals = len(groups)
        self.sizes = [len(g) for g in groups]
        # order[j] = class id at position j of the vertical-ordered logit vector
        self.order = torch.tensor(flat, dtype=torch.long)
        self.inverse = torch.empty(n, dtype=torch.long)
        self.inverse[self.order] = torch.arange(n)
        self.vertical_of = torch.empty(n, dtype=torch.long)
        for v, g in enumerate(groups):
            self.vertical_of[g] = v

    @classmethod
    def from_sizes(cls, sizes: Sequence[int]) -> "Verticals":
        """Contiguous verticals: sizes (3, 4) gives {0,1,2} and {3,4,5,6}."""
        starts = [sum(sizes[:v]) for v in range(len(sizes))]
        return cls([list(range(s, s + n)) for s, n in zip(starts, sizes)])


class StructurallyConnected(nn.Module):
    """A linear layer made of independent per-vertical blocks.

    `in_features` an int: every block reads the whole input (the SC layer after a shared FC,
    layout b). A sequence: the input is split into consecutive chunks, one per block, and the
    layer is block-diagonal. Only the blocks are parameters, so no weight crosses verticals.
    """

    def __init__(
        self,
        in_features: int | Sequence[int],
        out_features: Sequence[int],
        bias: bool = True,
    ):
        super().__init__()
        out_features = [int(o) for o in out_features]
        self.shared_input = isinstance(in_features, int)
        in_sizes = (
            [in_features] * len(out_features)
            if self.shared_input
            else [int(i) for i in in_features]
        )
        if len(in_sizes) != len(out_features):
            raise ValueError(
                f"got {len(in_sizes)} input blocks for {len(out_features)} output blocks"
            )
        self.in_sizes, self.out_sizes = in_sizes, out_features
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(o, i)) for i, o in zip(in_sizes, out_features)
        )
        self.bias = nn.Parameter(torch.zeros(sum(out_features))) if bias else None
        for w in self.weights:
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))

    def weight(self) -> torch.Tensor:
        """The full (sum out, in) weight with exact zeros across blocks."""
        if self.shared_input:
            return torch.cat(list(self.weights), dim=0)
        return torch.block_diag(*self.weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = self.in_sizes[0] if self.shared_input else sum(self.in_sizes)
        if x.shape[-1] != expected:
            raise ValueError(
                f"SC layer expects {expected} input features, got shape {tuple(x.shape)}"
            )
        return F.linear(x, self.weight(), self.bias)


class SelfPacedScale(nn.Module):
    """y_v = gamma_v * x_v / ||x_v|| for each vertical v of vertical-ordered logits x.

    gamma_v is initialised at sqrt(N_v) (`init="sqrt"`) or at a given number, learnable or
    fixed. The normalisation is over the vertical's logit vector (vertical level).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        init: str | float = "sqrt",
        learnable: bool = True,
        eps: float = 1e-6,
    ):
        super().__init__()
        if init == "sqrt":
            gamma = torch.tensor([math.sqrt(n) for n in sizes])
        elif isinstance(init, (int, float)):
            gamma = torch.full((len(sizes),), float(init))
        else:
            raise ValueError(f"init must be 'sqrt' or a number, got {init!r}")
        self.sizes = list(sizes)
        self.eps = eps
        if learnable:
            self.gamma = nn.Parameter(gamma)
        else:
            self.register_buffer("gamma", gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N) in vertical order
        parts = torch.split(x, self.sizes, dim=-1)
        out = [
            g * p / p.norm(dim=-1, keepdim=True).clamp_min(self.eps)
            for g, p in zip(self.gamma, parts)
        ]
        return torch.cat(out, dim=-1)


class ConcentrationHead(nn.Module):
    """Layout (b): FC(s1) - SC(s2 per vertical) - per-vertical classifier - self-paced scale.

    Returns logits (B, N) indexed by class id.
    """

    def __init__(
        self,
        in_dim: int,
        s1: int,
        s2: int,
        verticals: Verticals,
        gamma_init: str | float = "sqrt",
        learn_gamma: bool = True,
    ):
        super().__init__()
        self.verticals = verticals
        m = verticals.num_verticals
        self.fc = nn.Linear(in_dim, s1)
        self.sc = StructurallyConnected(s1, [s2] * m)
        self.classifier = StructurallyConnected([s2] * m, verticals.sizes)
        self.scale = SelfPacedScale(
            verticals.sizes, init=gamma_init, learnable=learn_gamma
        )
        self.register_buffer("inverse", verticals.inverse.clone(), persistent=False)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # (B, in_dim) -> (B, N)
        h = F.relu(self.fc(feats))
        h = F.relu(self.sc(h))  # (B, M * s2)
        y = self.scale(self.classifier(h))  # (B, N), vertical order
        return y[:, self.inverse]  # class-id order


def concentration_targets(
    teacher_probs_per_vertical: Sequence[torch.Tensor],
    labels: torch.Tensor,
    verticals: Verticals,
    top_k: int,
) -> torch.Tensor:
    """Soft targets z* (B, N).

    teacher_probs_per_vertical[v]: (B, N_v) sigmoid probabilities of teacher v over its
    vertical's classes, in the order of `verticals.groups[v]`. Each sample keeps only the
    teacher of its label's vertical, and of it only the top-K probabilities.
    """
    if len(teacher_probs_per_vertical) != verticals.num_verticals:
        raise ValueError(
            f"need {verticals.num_verticals} teacher outputs, got {len(teacher_probs_per_vertical)}"
        )
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    b = labels.shape[0]
    ref = teacher_probs_per_vertical[0]
    z = torch.zeros(b, verticals.num_classes, dtype=ref.dtype, device=ref.device)
    sample_vertical = verticals.vertical_of.to(labels.device)[labels]  # (B,)
    for v, (probs, group) in enumerate(
        zip(teacher_probs_per_vertical, verticals.groups)
    ):
        if probs.shape != (b, len(group)):
            raise ValueError(
                f"teacher {v} output must be {(b, len(group))}, got {tuple(probs.shape)}"
            )
        rows = (sample_vertical == v).nonzero(as_tuple=True)[0].to(z.device)
        if rows.numel() == 0:
            continue
        p = probs[rows]
        vals, idx = p.topk(min(top_k, len(group)), dim=-1)
        kept = torch.zeros_like(p).scatter_(-1, idx, vals)
        cols = torch.tensor(group, device=z.device)
        z[rows.unsqueeze(1), cols.unsqueeze(0)] = kept
    return z


def concentration_loss(
    student_logits: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Sigmoid (binary) cross-entropy of the student logits against z*, mean over entries."""
    return F.binary_cross_entropy_with_logits(student_logits, targets)
