"""Specification of genforge.core.attention: one entry point, exact softmax attention.

The reference below is written out independently of the module (its own float64 softmax and
its own causal rule), so a shared mask-building bug cannot hide in both sides.
"""

import importlib.util
import logging
import sys
import types

import pytest
import torch
from einops import rearrange

import genforge.core.attention as attn_mod
from genforge.core.attention import MultiHeadAttention, attention, attention_backend, naive_attention

ATOL = 1e-5
XFORMERS_INSTALLED = importlib.util.find_spec("xformers") is not None


def reference(q, k, v, *, keep=None, bias=None, causal=False, scale=None):
    """float64 softmax(q k^T * scale + bias) v; keep: bool, True = may attend."""
    q, k, v = q.double(), k.double(), v.double()
    n, m = q.shape[-2], k.shape[-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bhnd,bhmd->bhnm", q, k) * scale
    if bias is not None:
        scores = scores + bias.double()
    allowed = torch.ones_like(scores, dtype=torch.bool)
    if keep is not None:
        allowed = allowed & keep
    if causal:
        rule = torch.tensor([[j <= i for j in range(m)] for i in range(n)])
        allowed = allowed & rule
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = scores.exp() / scores.exp().sum(-1, keepdim=True)
    return torch.einsum("bhnm,bhmd->bhnd", weights, v)


@pytest.fixture(autouse=True)
def fresh_backend_state(monkeypatch):
    monkeypatch.delenv(attn_mod.BACKEND_ENV_VAR, raising=False)
    attn_mod._xformers_ops.cache_clear()
    yield
    attn_mod._xformers_ops.cache_clear()


def qkv(b=2, h=3, n=7, m=7, d=16, dv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g)
    k = torch.randn(b, h, m, d, generator=g)
    v = torch.randn(b, h, m, dv or d, generator=g)
    return q, k, v


def partial_keep(b, h, n, m, seed=1):
    """Random bool mask where every query keeps at least one key and some rows lose several."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(b, h, n, m, generator=g) > 0.4
    keep[..., 0] = True
    assert (~keep).any(dim=-1).sum() >= n  # several rows are partially masked
    return keep


@pytest.mark.parametrize("fn", [attention, naive_attention])
class TestExactSoftmaxAttention:
    def test_unmasked_equals_softmax_reference(self, fn):
        q, k, v = qkv()
        torch.testing.assert_close(fn(q, k, v).double(), reference(q, k, v), atol=ATOL, rtol=0)

    def test_bool_mask_blocks_exactly_the_false_keys(self, fn):
        q, k, v = qkv()
        keep = partial_keep(2, 3, 7, 7)
        torch.testing.assert_close(fn(q, k, v, mask=keep).double(), reference(q, k, v, keep=keep), atol=ATOL, rtol=0)

    def test_broadcast_key_padding_mask(self, fn):
        q, k, v = qkv(m=9)
        keep = torch.ones(2, 1, 1, 9, dtype=torch.bool)
        keep[0, ..., 6:] = False
        out = fn(q, k, v, mask=keep).double()
        torch.testing.assert_close(out, reference(q, k, v, keep=keep.expand(2, 3, 7, 9)), atol=ATOL, rtol=0)
        # the padded keys of batch 0 have no influence at all
        v2 = v.clone()
        v2[0, :, 6:] += 100.0
        torch.testing.assert_close(fn(q, k, v2, mask=keep).double(), out, atol=ATOL, rtol=0)

    def test_additive_float_mask_is_added_to_scores(self, fn):
        q, k, v = qkv()
        bias = torch.randn(1, 3, 7, 7, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(fn(q, k, v, mask=bias).double(), reference(q, k, v, bias=bias), atol=ATOL, rtol=0)

    def test_causal_attends_only_to_earlier_keys(self, fn):
        q, k, v = qkv()
        expected = reference(q, k, v, causal=True)
        torch.testing.assert_close(fn(q, k, v, causal=True).double(), expected, atol=ATOL, rtol=0)

    def test_causal_combined_with_bool_mask(self, fn):
        q, k, v = qkv()
        keep = partial_keep(2, 3, 7, 7)
        expected = reference(q, k, v, keep=keep, causal=True)
        torch.testing.assert_close(fn(q, k, v, mask=keep, causal=True).double(), expected, atol=ATOL, rtol=0)

    def test_causal_combined_with_float_mask(self, fn):
        q, k, v = qkv()
        bias = torch.randn(2, 1, 7, 7, generator=torch.Generator().manual_seed(3))
        expected = reference(q, k, v, bias=bias, causal=True)
        torch.testing.assert_close(fn(q, k, v, mask=bias, causal=True).double(), expected, atol=ATOL, rtol=0)

    def test_cross_attention_with_different_lengths(self, fn):
        q, k, v = qkv(n=5, m=11, dv=8)
        torch.testing.assert_close(fn(q, k, v).double(), reference(q, k, v), atol=ATOL, rtol=0)

    @pytest.mark.parametrize("n,m", [(4, 9), (9, 4)])
    def test_causal_with_unequal_lengths_is_top_left_aligned(self, fn, n, m):
        q, k, v = qkv(n=n, m=m)
        expected = reference(q, k, v, causal=True)  # query i sees keys 0..i
        torch.testing.assert_close(fn(q, k, v, causal=True).double(), expected, atol=ATOL, rtol=0)

    def test_scale_override(self, fn):
        q, k, v = qkv()
        torch.testing.assert_close(fn(q, k, v, scale=0.37).double(), reference(q, k, v, scale=0.37), atol=ATOL, rtol=0)


def test_naive_attention_keeps_the_input_dtype():
    q, k, v = qkv()
    out = naive_attention(q.double(), k.double(), v.double(), causal=True)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference(q, k, v, causal=True), atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "shapes",
    [
        ((2, 3, 7, 16), (2, 3, 7, 8), (2, 3, 7, 16)),  # head dim of q and k differ
        ((2, 3, 7, 16), (2, 3, 7, 16), (2, 3, 6, 16)),  # k and v lengths differ
        ((2, 3, 7, 16), (2, 4, 7, 16), (2, 4, 7, 16)),  # head counts differ
        ((3, 7, 16), (3, 7, 16), (3, 7, 16)),  # 3-D inputs
    ],
)
def test_mismatched_shapes_raise_value_error_naming_them(shapes):
    q, k, v = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=r"q \(.*\), k \(.*\), v \("):
        attention(q, k, v)


def test_mask_that_does_not_broadcast_is_rejected():
    q, k, v = qkv(n=5, m=6)
    with pytest.raises(ValueError, match=r"mask of shape \(5, 5\)"):
        attention(q, k, v, mask=torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        attention(q, k, v, mask=torch.ones(5, 6, dtype=torch.long))


def test_dispatcher_uses_sdpa_on_cpu():
    assert attention_backend(torch.device("cpu")) == "sdpa"
    assert attention_backend("cpu", torch.float16, has_mask=True) == "sdpa"


def test_env_var_forcing_sdpa_and_rejecting_unknown_values(monkeypatch):
    monkeypatch.setenv(attn_mod.BACKEND_ENV_VAR, "sdpa")
    assert attention_backend(torch.device("cuda")) == "sdpa"
    monkeypatch.setenv(attn_mod.BACKEND_ENV_VAR, "flash")
    with pytest.raises(ValueError, match="flash"):
        attention_backend(torch.device("cpu"))


@pytest.mark.skipif(XFORMERS_INSTALLED, reason="this machine has xformers")
def test_forcing_xformers_without_it_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(attn_mod.BACKEND_ENV_VAR, "xformers")
    with pytest.raises(RuntimeError, match="xformers is not installed"):
        attention_backend(torch.device("cuda"))
    with pytest.raises(RuntimeError, match="CUDA tensors only"):
        attention(*qkv())


class FakeLowerTriangularMask:
    """Stands in for xformers.ops.LowerTriangularMask (top-left causal)."""


def fake_xformers(kernel_error=None, calls=None):
    """A stand-in for xformers.ops following its documented contract: (B, N, H, D) inputs,
    attn_bias None | LowerTriangularMask | tensor (B, H, N, M) with strides aligned to 8."""

    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None):
        if calls is not None:
            calls.append(attn_bias)
        if kernel_error is not None:
            raise kernel_error
        q, k, v = (rearrange(t, "b n h d -> b h n d") for t in (query, key, value))
        if isinstance(attn_bias, torch.Tensor):
            assert attn_bias.shape == (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            assert attn_bias.dtype == q.dtype
            assert all(s % 8 == 0 for s in attn_bias.stride()[:-1]), attn_bias.stride()
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        scores = q @ k.transpose(-2, -1) * scale
        if isinstance(attn_bias, FakeLowerTriangularMask):
            n, m = scores.shape[-2:]
            scores = scores.masked_fill(~torch.ones(n, m, dtype=torch.bool).tril(), float("-inf"))
        elif attn_bias is not None:
            scores = scores + attn_bias
        return rearrange(scores.softmax(-1) @ v, "b h n d -> b n h d")

    return types.SimpleNamespace(
        memory_efficient_attention=memory_efficient_attention, LowerTriangularMask=FakeLowerTriangularMask
    )


def install_fake_xformers(monkeypatch, fake):
    package = types.ModuleType("xformers")
    package.ops = fake
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", fake)
    monkeypatch.setattr(attn_mod, "_probe_inputs", lambda: tuple(torch.randn(1, 8, 2, 16) for _ in range(3)))


def test_failing_xformers_probe_falls_back_to_sdpa_with_one_warning(monkeypatch, caplog):
    calls = []
    error = RuntimeError("CUDA error: no kernel image is available\nCompile with TORCH_USE_CUDA_DSA to debug.")
    install_fake_xformers(monkeypatch, fake_xformers(error, calls))
    with caplog.at_level(logging.WARNING, logger=attn_mod.__name__):
        backends = {attention_backend(torch.device("cuda"), torch.float16) for _ in range(20)}
    assert backends == {"sdpa"}
    assert len(calls) == 1  # probed once
    warnings = [r for r in caplog.records if r.name == attn_mod.__name__]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "no kernel image is available" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()
    monkeypatch.setenv(attn_mod.BACKEND_ENV_VAR, "xformers")
    with pytest.raises(RuntimeError, match="kernels do not run"):
        attention_backend(torch.device("cuda"))


def test_passing_probe_selects_xformers_for_unmasked_cuda_attention(monkeypatch, caplog):
    install_fake_xformers(monkeypatch, fake_xformers())
    with caplog.at_level(logging.WARNING, logger=attn_mod.__name__):
        assert attention_backend(torch.device("cuda"), torch.bfloat16) == "xformers"
        assert attention_backend(torch.device("cuda"), torch.float16, has_mask=True) == "sdpa"
        assert attention_backend(torch.device("cuda"), torch.float64) == "sdpa"
        assert attention_backend(torch.device("cpu"), torch.float16) == "sdpa"
    assert not caplog.records


@pytest.mark.parametrize("case", ["plain", "causal", "bool", "float", "causal+bool", "cross"])
def test_xformers_path_converts_layout_and_masks(monkeypatch, case):
    """The (B, N, H, D) layout, LowerTriangularMask and the aligned dense bias, checked on CPU
    against a stand-in that implements xformers' documented semantics."""
    calls = []
    fake = fake_xformers(calls=calls)
    n, m = (5, 11) if case == "cross" else (7, 7)
    q, k, v = qkv(n=n, m=m)
    keep = partial_keep(2, 3, n, m) if "bool" in case else None
    bias = torch.randn(1, 3, n, m) if case == "float" else None
    causal = "causal" in case
    out = attn_mod._xformers_attention(fake, q, k, v, keep if keep is not None else bias, causal, 0.3)
    expected = reference(q, k, v, keep=keep, bias=bias, causal=causal, scale=0.3)
    torch.testing.assert_close(out.double(), expected, atol=ATOL, rtol=0)
    if case == "causal":
        assert isinstance(calls[0], FakeLowerTriangularMask)  # no dense bias for plain causal


def per_head_loop_reference(mha, x, causal=False):
    b, n, dim = x.shape
    h = mha.num_heads
    d = dim // h
    w_qkv, b_qkv = mha.qkv.weight.double(), mha.qkv.bias
    xq = x.double() @ w_qkv.T + (b_qkv.double() if b_qkv is not None else 0)
    heads = []
    for i in range(h):
        qi = xq[..., i * d : (i + 1) * d]
        ki = xq[..., dim + i * d : dim + (i + 1) * d]
        vi = xq[..., 2 * dim + i * d : 2 * dim + (i + 1) * d]
        scores = qi @ ki.transpose(-1, -2) / d**0.5
        if causal:
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        heads.append(scores.softmax(-1) @ vi)
    concat = torch.cat(heads, dim=-1)
    out = concat @ mha.proj.weight.double().T
    return out + mha.proj.bias.double() if mha.proj.bias is not None else out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_multihead_attention_equals_per_head_loop(causal, qkv_bias):
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4, qkv_bias=qkv_bias)
    x = torch.randn(2, 9, 32)
    expected = per_head_loop_reference(mha, x, causal)
    torch.testing.assert_close(mha(x, causal=causal).double(), expected, atol=ATOL, rtol=0)


def test_causal_output_at_i_ignores_tokens_after_i():
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4)
    x = torch.randn(1, 10, 32)
    i = 4
    x_changed = x.clone()
    x_changed[:, i + 1 :] = torch.randn(1, 10 - i - 1, 32) * 5
    out, out_changed = mha(x, causal=True), mha(x_changed, causal=True)
    torch.testing.assert_close(out[:, : i + 1], out_changed[:, : i + 1], atol=ATOL, rtol=0)
    assert not torch.allclose(out[:, i + 1 :], out_changed[:, i + 1 :], atol=1e-3)


def test_multihead_attention_mask_is_passed_through():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 2)
    x = torch.randn(2, 6, 16)
    keep = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    keep[:, ..., 4:] = False
    x_changed = x.clone()
    x_changed[:, 4:] += 3.0
    # the padded tokens change their own outputs but not those of the tokens they cannot reach
    torch.testing.assert_close(mha(x, mask=keep)[:, :4], mha(x_changed, mask=keep)[:, :4], atol=ATOL, rtol=0)


@pytest.mark.parametrize("upcast,expected", [(True, torch.float32), (False, torch.bfloat16)])
def test_upcast_runs_attention_in_float32_under_autocast(monkeypatch, upcast, expected):
    seen = []
    real_attention = attn_mod.attention

    def spy(q, k, v, **kwargs):
        out = real_attention(q, k, v, **kwargs)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(attn_mod, "attention", spy)
    mha = MultiHeadAttention(16, 2, upcast=upcast)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mha(torch.randn(2, 5, 16))
    assert seen == [expected]
    assert y.dtype == torch.bfloat16


def test_multihead_attention_rejects_bad_input():
    with pytest.raises(ValueError, match="not divisible"):
        MultiHeadAttention(30, 4)
    with pytest.raises(ValueError, match=r"\(B, N, 16\).*\(2, 5, 8\)"):
        MultiHeadAttention(16, 2)(torch.randn(2, 5, 8))
