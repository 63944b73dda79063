"""Specification of the chunk-causal hybrid attention of ARFlow (genforge.core.attention).

The reference builds the whole (L x L) weight matrix in float64 from explicit masks: a
block-diagonal softmax inside each chunk, and for a key in an earlier chunk m < i the weight
(q_ij . k_mk) exp(cumg_ij) prod_{l=m+1}^{i-1} gamma_l, plus the carried state's term, summed
chunk pair by chunk pair; it shares no code with the module.
"""

import math

import pytest
import torch

from genforge.core.attention import chunk_hybrid_attention, chunk_hybrid_attention_step, chunk_linear_attention

B, H, N, D, DV = 2, 3, 4, 8, 6


def inputs(chunks, seed=0, dtype=torch.float32, with_state=False):
    g = torch.Generator().manual_seed(seed)
    length = chunks * N
    q = torch.randn(B, H, length, D, generator=g, dtype=dtype)
    k = torch.randn(B, H, length, D, generator=g, dtype=dtype)
    v = torch.randn(B, H, length, DV, generator=g, dtype=dtype)
    log_gate = torch.nn.functional.logsigmoid(torch.randn(B, H, length, generator=g, dtype=dtype) * 3)
    state = torch.randn(B, H, D, DV, generator=g, dtype=dtype) if with_state else None
    return q, k, v, log_gate, state


def reference(q, k, v, log_gate, state=None, scale=None, inner=True):
    """float64 out (B, H, L, Dv) from an explicit (L x L) weight matrix and explicit state sums."""
    q, k, v, g = q.double(), k.double(), v.double(), log_gate.double()
    length = q.shape[2]
    chunks = length // N
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k = k * scale
    weights = torch.zeros(B, H, length, length, dtype=torch.float64)
    gamma = [g[..., m * N:(m + 1) * N].mean(-1).exp() for m in range(chunks)]  # (B, H) each
    out = torch.zeros(B, H, length, v.shape[-1], dtype=torch.float64)
    for i in range(chunks):
        rows = slice(i * N, (i + 1) * N)
        qi = q[:, :, rows]
        if inner:
            scores = qi @ k[:, :, rows].transpose(-1, -2)
            weights[:, :, rows, rows] = scores.exp() / scores.exp().sum(-1, keepdim=True)
        query_decay = g[:, :, rows].cumsum(-1).exp()  # (B, H, N)
        for m in range(i):
            chain = torch.ones(B, H, dtype=torch.float64)
            for l in range(m + 1, i):
                chain = chain * gamma[l]
            cols = slice(m * N, (m + 1) * N)
            weights[:, :, rows, cols] = (qi @ k[:, :, cols].transpose(-1, -2)) * query_decay[..., None] \
                * chain[..., None, None]
        if state is not None:
            chain = torch.ones(B, H, dtype=torch.float64)
            for l in range(i):
                chain = chain * gamma[l]
            out[:, :, rows] += (qi * query_decay[..., None]) @ state.double() * chain[..., None, None]
    return out + weights @ v


@pytest.mark.parametrize("chunks", [1, 3, 5])
@pytest.mark.parametrize("with_state", [False, True])
def test_hybrid_equals_naive_float64_reference(chunks, with_state):
    q, k, v, g, state = inputs(chunks, with_state=with_state)
    out, _ = chunk_hybrid_attention(q.double(), k.double(), v.double(), g.double(), N,
                                    state=None if state is None else state.double())
    torch.testing.assert_close(out, reference(q, k, v, g, state), atol=1e-10, rtol=0)
    out32, _ = chunk_hybrid_attention(q, k, v, g, N, state=state)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), reference(q, k, v, g, state), atol=1e-5, rtol=1e-5)


def test_linear_part_is_the_cross_chunk_term_alone_and_scale_applies_to_keys():
    q, k, v, g, state = inputs(4, with_state=True)
    cross, _ = chunk_linear_attention(q.double(), k.double(), v.double(), g.double(), N, state=state.double(),
                                      scale=0.3)
    torch.testing.assert_close(cross, reference(q, k, v, g, state, scale=0.3, inner=False), atol=1e-10, rtol=0)


def test_recurrent_form_one_chunk_per_call_equals_parallel_form():
    q, k, v, g, state0 = inputs(5, with_state=True)
    for start in (None, state0):
        parallel, last = chunk_hybrid_attention(q, k, v, g, N, state=start)
        state, outs = start, []
        for i in range(5):
            rows = slice(i * N, (i + 1) * N)
            out, state = chunk_hybrid_attention_step(q[:, :, rows], k[:, :, rows], v[:, :, rows], g[:, :, rows],
                                                     state=state)
            outs.append(out)
        torch.testing.assert_close(torch.cat(outs, dim=2), parallel, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state, last, atol=1e-5, rtol=1e-5)


def test_returned_state_continues_the_sequence():
    q, k, v, g, _ = inputs(6)
    full, last = chunk_hybrid_attention(q, k, v, g, N)
    cut = 2 * N
    first, mid = chunk_hybrid_attention(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], g[:, :, :cut], N)
    second, end = chunk_hybrid_attention(q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], g[:, :, cut:], N, state=mid)
    torch.testing.assert_close(torch.cat([first, second], dim=2), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(end, last, atol=1e-5, rtol=1e-5)


def test_a_later_chunk_never_influences_an_earlier_one():
    chunks = 4
    q, k, v, g, _ = (t.requires_grad_() if t is not None else t for t in inputs(chunks))
    out, _ = chunk_hybrid_attention(q, k, v, g, N)
    for i in range(chunks):
        grads = torch.autograd.grad(out[:, :, i * N:(i + 1) * N].sum(), (q, k, v, g), retain_graph=True)
        for grad in grads:
            assert torch.count_nonzero(grad[:, :, (i + 1) * N:]) == 0  # later chunks: exactly no influence
        if i > 0:  # earlier chunks do reach chunk i, through keys and values
            assert all(grad[:, :, : i * N].abs().sum() > 0 for grad in grads[1:3])
        if i > 1:  # and through the decays of the chunks in between (chunk 0's decays an empty state)
            assert grads[3][:, :, N: i * N].abs().sum() > 0


def test_attention_inside_a_chunk_is_bidirectional():
    q, k, v, g, _ = inputs(3)
    v = v.requires_grad_()
    out, _ = chunk_hybrid_attention(q, k, v, g, N)
    first_token_of_chunk_1 = out[:, :, N].sum()
    (grad,) = torch.autograd.grad(first_token_of_chunk_1, v)
    assert (grad[:, :, N:2 * N].abs().sum(-1) > 0).all()  # every token of its chunk, later ones included


def test_flops_grow_linearly_in_chunks():
    """8x the chunks cost 8x the FLOPs (torch's FlopCounterMode); full softmax attention over the
    whole sequence would cost 64x."""
    from torch.utils.flop_counter import FlopCounterMode

    def flops(chunks):
        q, k, v, g, _ = inputs(chunks)
        with FlopCounterMode(display=False) as counter:
            chunk_hybrid_attention(q, k, v, g, N)
        return counter.get_total_flops()

    ratio = flops(32) / flops(4)
    assert math.isclose(ratio, 8.0, rel_tol=0.05), ratio


@pytest.mark.parametrize("bad,match", [
    ({"length": 10}, "sequence length 10 is not a multiple of chunk_size 4"),
    ({"gate": (B, H, 7)}, r"log_gate must have shape \(B, H, L\)"),
    ({"state": (B, H, D, D + 1)}, r"state must have shape \(B, H, D, Dv\)"),
    ({"chunk": 0}, "chunk_size must be a positive int"),
])
def test_bad_input_is_a_clear_error(bad, match):
    length = bad.get("length", 8)
    q, k, v = torch.zeros(B, H, length, D), torch.zeros(B, H, length, D), torch.zeros(B, H, length, DV)
    g = torch.zeros(bad.get("gate", (B, H, length)))
    state = torch.zeros(bad["state"]) if "state" in bad else None
    with pytest.raises(ValueError, match=match):
        chunk_hybrid_attention(q, k, v, g, bad.get("chunk", 4), state=state)
