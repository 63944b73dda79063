"""One attention entry point: scaled dot-product attention on the best backend available.

Scaled dot-product attention (Vaswani et al., "Attention Is All You Need", NeurIPS 2017,
arXiv 1706.03762, Eq. 1), with an optional additive bias B::

    Attention(Q, K, V) = softmax(Q K^T * scale + B) V,        scale = 1 / sqrt(D) by default

:func:`attention` computes it with one of two backends, chosen by :func:`attention_backend`:

- ``"xformers"``: ``xformers.ops.memory_efficient_attention`` (Lefaudeux et al., xFormers,
  2022), the memory-efficient algorithm of Rabe & Staats, "Self-attention Does Not Need
  O(n^2) Memory", arXiv 2112.05682, which never materialises the (N, M) score matrix.
  Used only for CUDA tensors, and only when xformers imports *and* a one-time probe shows
  its compiled kernels run: a wheel built for another torch version imports fine and then
  fails in every kernel call.
- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention``, which picks its own
  flash / memory-efficient / math kernel. Always used on CPU and for float64.

Conventions shared by both backends:

- Shapes: q (B, H, N, D), k (B, H, M, D), v (B, H, M, Dv) -> (B, H, N, Dv).
- ``mask`` is boolean (True = the query may attend to the key) or an additive float bias,
  broadcastable to (B, H, N, M).
- ``causal=True`` lets query i attend to key j iff j <= i, aligned at the top-left corner
  when N != M (mask = ones(N, M).tril()). This is the convention of SDPA's ``is_causal`` and
  of xformers' ``LowerTriangularMask``. For decoding with a key/value cache, where the N
  queries are the *last* N of M positions, pass the bottom-right mask explicitly instead.
  ``causal`` and ``mask`` together allow a key only where both allow it.
- A query row whose keys are all masked out has no defined value: SDPA currently returns
  zeros there on CPU and :func:`naive_attention` returns NaN. Callers must not rely on either.

``GENFORGE_ATTENTION=sdpa|xformers`` forces a backend; forcing xformers where it cannot run
raises an error that says why.

Chunk-causal hybrid attention (ARFlow, Hui et al., arXiv 2501.16085, Sec. 3.2; the official
``GateRetention`` of TheFllood/ARFlow). A sequence of S chunks of N tokens (one chunk per image)
attends with full softmax inside its own chunk and, across chunks, only through a gated,
decayed linear-attention state. Per head, with k already scaled by ``scale`` and log-gates
g <= 0 (one per token):

    inner_i  = softmax(q_i k_i^T) v_i                          (bidirectional inside chunk i)
    kv_m     = k_m^T v_m,   gamma_m = exp(mean_j g_{m,j})       (chunk state and chunk decay)
    S_0      = carried state (or 0),   S_{m+1} = gamma_m S_m + kv_m
    cross_ij = (q_ij * exp(sum_{j' <= j} g_{i,j'})) S_i         (strictly earlier chunks)
    out_i    = inner_i + cross_i

so a key in chunk m < i reaches query (i, j) with weight (q_ij . k_mk) exp(cumg_ij)
prod_{l=m+1}^{i-1} gamma_l and no softmax denominator. :func:`chunk_linear_attention` is the
cross term alone (gated linear attention over earlier chunks), :func:`chunk_hybrid_attention`
the sum, in the chunk-parallel form for training: batched matmuls over all chunks and one
scan over chunks for the states (the official code runs that scan as a Triton kernel; here it
is S batched (d x d) updates in torch, any device). :func:`chunk_hybrid_attention_step` is the
recurrent form for generation: one chunk per call, state in and out. All three compute in at
least float32, as the official kernel does, and return the outputs in the inputs' dtype.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

logger = logging.getLogger(__name__)

BACKEND_ENV_VAR = "GENFORGE_ATTENTION"
BACKENDS = ("sdpa", "xformers")
_XFORMERS_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# xformers' kernels read a tensor bias with every stride but the last a multiple of
# 128 bits (8 half-precision elements), so biases are allocated padded to this width.
_XFORMERS_BIAS_ALIGNMENT = 8


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> None:
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects 4-D q (B, H, N, D), k (B, H, M, D), v (B, H, M, Dv); got {shapes}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention expects q (B, H, N, D), k (B, H, M, D), v (B, H, M, Dv); got {shapes}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if mask is None:
        return
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(f"mask must be bool (True = may attend) or an additive float bias; got {mask.dtype}")
    try:
        broadcastable = torch.broadcast_shapes(mask.shape, target) == target
    except RuntimeError:
        broadcastable = False
    if not broadcastable:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to (B, H, N, M) = {target} for {shapes}"
        )


def _causal_keep(n: int, m: int, device: torch.device) -> torch.Tensor:
    """(N, M) bool, True where key j <= query i (top-left aligned, as SDPA's is_causal)."""
    return torch.ones(n, m, dtype=torch.bool, device=device).tril()


def _merge_causal(mask: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The mask with every key after its query removed; keeps the mask's kind (bool or bias)."""
    keep = _causal_keep(n, m, mask.device)
    if mask.dtype == torch.bool:
        return mask & keep
    return torch.where(keep, mask, torch.full((), float("-inf"), dtype=mask.dtype, device=mask.device))


def _additive_bias(
    mask: torch.Tensor | None, causal: bool, n: int, m: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """Mask and causality as one additive bias in `dtype` (0 = attend, -inf = blocked), or None."""
    if causal:
        mask = _causal_keep(n, m, device) if mask is None else _merge_causal(mask, n, m)
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, float("-inf"))
    return mask.to(dtype)


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(Q K^T * scale + bias) V written out, in the inputs' dtype.

    Materialises the (B, H, N, M) score matrix: the reference for tests and the baseline of
    ``eval/benchmarks/attention.py``. Same arguments and conventions as :func:`attention`.
    """
    _check_inputs(q, k, v, mask)
    n, m = q.shape[-2], k.shape[-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q * scale) @ k.transpose(-2, -1)  # (B, H, N, M)
    bias = _additive_bias(mask, causal, n, m, q.dtype, q.device)
    if bias is not None:
        scores = scores + bias
    return scores.softmax(dim=-1) @ v  # (B, H, N, Dv)


def _probe_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A tiny half-precision q, k, v in xformers' (B, N, H, D) layout on the current GPU.

    Deterministic values, so probing leaves the CUDA random state untouched.
    """
    x = torch.linspace(-2, 2, 256, device="cuda", dtype=torch.float16).reshape(1, 8, 2, 16)
    return x, x.cos(), x.sin()


def _one_line(err: Exception) -> str:
    """An exception as one short log line: CUDA errors often span many lines."""
    return f"{type(err).__name__}: " + " ".join(str(err).split())[:300]


@functools.lru_cache(maxsize=1)
def _xformers_ops():
    """``(xformers.ops, None)`` when its kernels run here, else ``(None, reason)``.

    Runs once per process: imports xformers, runs one causal kernel on a tiny input and
    checks it against SDPA. A failing probe is logged once, as a single warning line.
    """
    try:
        import xformers.ops as xops
    except ImportError:
        return None, "xformers is not installed (pip install 'genforge[xformers]')"
    except Exception as err:  # a broken install can fail at import with any error
        reason = f"xformers failed to import ({_one_line(err)})"
        logger.warning("%s; attention falls back to torch scaled_dot_product_attention", reason)
        return None, reason
    try:
        q, k, v = _probe_inputs()
        out = xops.memory_efficient_attention(q, k, v, attn_bias=xops.LowerTriangularMask())
        expected = F.scaled_dot_product_attention(
            *(rearrange(t, "b n h d -> b h n d") for t in (q, k, v)), is_causal=True
        )
        # Comparing waits for the kernel, so asynchronous CUDA errors surface here too.
        if not torch.allclose(rearrange(out, "b n h d -> b h n d").float(), expected.float(), atol=1e-2):
            raise RuntimeError("memory_efficient_attention disagrees with scaled_dot_product_attention")
    except Exception as err:  # kernels built for another torch/CUDA fail here with varied errors
        reason = f"xformers is installed but its kernels do not run ({_one_line(err)})"
        logger.warning("%s; attention falls back to torch scaled_dot_product_attention", reason)
        return None, reason
    return xops, None


def _xformers_unusable(device: torch.device, dtype: torch.dtype | None) -> str | None:
    """Why xformers cannot compute attention for this device and dtype, or None if it can."""
    if device.type != "cuda":
        return f"xformers runs on CUDA tensors only, got device {device}"
    if dtype is not None and dtype not in _XFORMERS_DTYPES:
        return f"xformers has no kernels for {dtype}"
    return _xformers_ops()[1]


def attention_backend(device: torch.device | str, dtype: torch.dtype | None = None, has_mask: bool = False) -> str:
    """The backend :func:`attention` uses for these inputs: ``"xformers"`` or ``"sdpa"``.

    ``GENFORGE_ATTENTION`` forces a choice (``RuntimeError`` if xformers is forced where it
    cannot run). Otherwise xformers is chosen for CUDA tensors of float16, bfloat16 or
    float32 when its kernels pass the one-time probe, except for masked calls
    (``has_mask=True``): xformers needs the mask as a dense, padded bias copy, while SDPA's
    own memory-efficient kernel (ported from xformers) takes the mask as given. On CPU the
    answer is always ``"sdpa"``.
    """
    device = torch.device(device)
    forced = os.environ.get(BACKEND_ENV_VAR, "").strip().lower()
    if forced and forced not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV_VAR}={forced!r}; expected one of {BACKENDS} or unset")
    if forced == "sdpa":
        return "sdpa"
    reason = _xformers_unusable(device, dtype)
    if forced == "xformers":
        if reason is not None:
            raise RuntimeError(f"{BACKEND_ENV_VAR}=xformers, but {reason}; unset it or set it to 'sdpa'")
        return "xformers"
    return "sdpa" if has_mask or reason is not None else "xformers"


def _xformers_attention(
    xops,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    scale: float | None,
) -> torch.Tensor:
    """Attention through ``xops.memory_efficient_attention``, which works in (B, N, H, D)."""
    b, h, n, _ = q.shape
    m = k.shape[-2]
    if mask is None:
        attn_bias = xops.LowerTriangularMask() if causal else None
    else:
        bias = _additive_bias(mask, causal, n, m, q.dtype, q.device)
        padded = -(-m // _XFORMERS_BIAS_ALIGNMENT) * _XFORMERS_BIAS_ALIGNMENT
        attn_bias = q.new_empty(b, h, n, padded)[..., :m]  # (B, H, N, M), aligned strides
        attn_bias.copy_(bias.expand(b, h, n, m))
    out = xops.memory_efficient_attention(
        rearrange(q, "b h n d -> b n h d"),
        rearrange(k, "b h m d -> b m h d"),
        rearrange(v, "b h m d -> b m h d"),
        attn_bias=attn_bias,
        scale=scale,
    )
    return rearrange(out, "b n h d -> b h n d")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(Q K^T * scale + bias) V on the backend :func:`attention_backend` picks.

    Args:
        q: (B, H, N, D) queries.
        k: (B, H, M, D) keys.
        v: (B, H, M, Dv) values.
        mask: bool (True = may attend) or additive float, broadcastable to (B, H, N, M).
        causal: query i attends to keys j <= i, top-left aligned when N != M; combined with
            ``mask`` when both are given.
        scale: multiplies Q K^T; defaults to D ** -0.5.

    Returns:
        (B, H, N, Dv), in the inputs' dtype.

    Raises:
        ValueError: shapes, dtypes or mask that do not fit together.
    """
    _check_inputs(q, k, v, mask)
    if attention_backend(q.device, q.dtype, has_mask=mask is not None) == "xformers":
        return _xformers_attention(_xformers_ops()[0], q, k, v, mask, causal, scale)
    if mask is not None:
        if causal:
            mask = _merge_causal(mask, q.shape[-2], k.shape[-2])
            causal = False
        if mask.dtype != torch.bool:
            mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention (Vaswani et al. 2017, Sec. 3.2.2) through :func:`attention`.

    ``qkv`` projects x to queries, keys and values of all heads at once; ``proj`` maps the
    concatenated heads back to ``dim``. With ``upcast=True`` (default) the attention itself
    runs in at least float32, outside any autocast region, and is cast back to the dtype of
    the projections, as DiMR computes attention in float32 under mixed precision.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, out_bias: bool = True, upcast: bool = True):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.upcast = upcast
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=out_bias)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        """x (B, N, dim) -> (B, N, dim); ``mask`` and ``causal`` as in :func:`attention`."""
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(
                f"MultiHeadAttention(dim={self.dim}) expects x of shape (B, N, {self.dim}); got {tuple(x.shape)}"
            )
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        projection_dtype = q.dtype
        context = contextlib.nullcontext()
        if self.upcast:
            compute_dtype = torch.promote_types(q.dtype, torch.float32)
            q, k, v = q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype)
            context = torch.autocast(x.device.type, enabled=False)
        with context:
            out = attention(q, k, v, mask=mask, causal=causal)  # (B, H, N, D)
        out = rearrange(out, "b h n d -> b n (h d)").to(projection_dtype)
        return self.proj(out)


def _check_chunked(q, k, v, log_gate, chunk_size, state) -> tuple[int, int]:
    """(chunks, chunk size) of a chunked hybrid-attention call; ValueError naming what is wrong."""
    _check_inputs(q, k, v, None)
    b, h, n, d = q.shape
    if k.shape[2] != n:
        raise ValueError(f"chunked attention is self-attention: q has {n} tokens, k and v have {k.shape[2]}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if n % chunk_size != 0:
        raise ValueError(f"sequence length {n} is not a multiple of chunk_size {chunk_size}")
    if tuple(log_gate.shape) != (b, h, n):
        raise ValueError(f"log_gate must have shape (B, H, L) = {(b, h, n)}, got {tuple(log_gate.shape)}")
    if state is not None and tuple(state.shape) != (b, h, d, v.shape[-1]):
        raise ValueError(f"state must have shape (B, H, D, Dv) = {(b, h, d, v.shape[-1])}, got {tuple(state.shape)}")
    return n // chunk_size, chunk_size


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def chunk_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gate: torch.Tensor,
    chunk_size: int,
    *,
    state: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-chunk term: gated, decayed linear attention over strictly earlier chunks.

    Args:
        q, k, v: (B, H, L, D), (B, H, L, D), (B, H, L, Dv) with L = S * ``chunk_size``.
        log_gate: (B, H, L) log-gates g (<= 0 in ARFlow: logsigmoid / 16).
        chunk_size: tokens per chunk N.
        state: (B, H, D, Dv) state carried in from before the first chunk (S_0), or None (0).
        scale: multiplies k; defaults to D ** -0.5.

    Returns:
        (cross (B, H, L, Dv) in the inputs' dtype, the state after the last chunk S_S in float32
        or wider): feeding that state to a call on the following chunks continues the sequence.
    """
    num_chunks, n = _check_chunked(q, k, v, log_gate, chunk_size, state)
    dtype = _compute_dtype(q)
    b, h, length, d = q.shape
    scale = d**-0.5 if scale is None else scale
    qc = q.to(dtype).reshape(b, h, num_chunks, n, d)
    kc = k.to(dtype).reshape(b, h, num_chunks, n, d)
    vc = v.to(dtype).reshape(b, h, num_chunks, n, v.shape[-1])
    g = log_gate.to(dtype).reshape(b, h, num_chunks, n)
    # (B, H, S, D, Dv): one batched matmul for every chunk, scaled after it so that no scaled copy
    # of k is kept for the backward
    kv = (kc.transpose(-1, -2) @ vc) * scale
    decay = g.mean(-1).exp()[..., None, None]  # (B, H, S, 1, 1): gamma_m
    current = q.new_zeros(b, h, d, v.shape[-1], dtype=dtype) if state is None else state.to(dtype)
    reads = []
    # the scan over chunks, S_{m+1} = gamma_m S_m + kv_m, reading q_m S_m on the way. unbind, not
    # indexing: the backward of S indexings would build S full-size zero gradients (a cost
    # quadratic in the chunks); reading each S_m as it is made keeps no stacked copy of the states
    for q_m, gamma, kv_m in zip(qc.unbind(2), decay.unbind(2), kv.unbind(2)):
        reads.append(q_m @ current)
        current = gamma * current + kv_m
    cross = torch.stack(reads, dim=2) * g.cumsum(-1).exp()[..., None]  # (B, H, S, N, Dv): q_i e^{G_i} S_m
    return cross.reshape(b, h, length, v.shape[-1]).to(q.dtype), current


def chunk_hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gate: torch.Tensor,
    chunk_size: int,
    *,
    state: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk-causal hybrid attention, chunk-parallel form: softmax inside each chunk plus
    :func:`chunk_linear_attention` across chunks. Same arguments and returns as that function.

    The softmax part is :func:`attention` on the chunks as extra heads, so it runs on SDPA's
    (or xformers') fused kernels; no (L x L) matrix is formed.
    """
    num_chunks, n = _check_chunked(q, k, v, log_gate, chunk_size, state)
    cross, last = chunk_linear_attention(q, k, v, log_gate, chunk_size, state=state, scale=scale)
    b, h, length, d = q.shape
    dtype = _compute_dtype(q)
    qc, kc, vc = (t.to(dtype).reshape(b, h * num_chunks, n, t.shape[-1]) for t in (q, k, v))
    inner = attention(qc, kc, vc, scale=d**-0.5 if scale is None else scale)
    return (inner.reshape(b, h, length, v.shape[-1]) + cross.to(dtype)).to(q.dtype), last


def chunk_hybrid_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gate: torch.Tensor,
    *,
    state: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk-causal hybrid attention, recurrent form: one chunk (all L tokens of q) per call.

    out = softmax(q k^T) v + (q * exp(cumsum g)) S_in;  S_out = exp(mean g) S_in + k^T v.
    Called chunk after chunk with the returned state, it reproduces
    :func:`chunk_hybrid_attention` on the whole sequence. Arguments as there, one chunk long.
    """
    _check_chunked(q, k, v, log_gate, q.shape[-2], state)
    dtype = _compute_dtype(q)
    d = q.shape[-1]
    q32, v32, g = q.to(dtype), v.to(dtype), log_gate.to(dtype)
    k32 = k.to(dtype) * (d**-0.5 if scale is None else scale)
    inner = attention(q32, k32, v32, scale=1.0)
    if state is None:
        return inner.to(q.dtype), k32.transpose(-1, -2) @ v32
    state = state.to(dtype)
    out = inner + (q32 * g.cumsum(-1).exp()[..., None]) @ state
    return out.to(q.dtype), g.mean(-1).exp()[..., None, None] * state + k32.transpose(-1, -2) @ v32
