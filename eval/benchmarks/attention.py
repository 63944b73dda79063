"""Benchmark: genforge's attention entry point against naive softmax attention.

Times :func:`genforge.core.attention.attention` (SDPA on CPU; xformers or SDPA on CUDA, as
:func:`attention_backend` decides) and :func:`naive_attention`, which materialises the
(B, H, N, N) score matrix, on self-attention inputs of B=1, H=8, D=64 at 256, 1024 and 4096
tokens, and prints one markdown table of side-by-side ratios:

    tokens | ours ms | naive ms | time ratio (naive/ours) | ours peak MiB | naive peak MiB | memory ratio

Time: median wall-clock of ``--repeats`` calls after ``--warmup`` calls, under
``torch.inference_mode`` (CUDA calls are synchronised before the clock stops).

Peak memory is the extra memory one call needs on top of its inputs (scratch buffers plus
the output):

- CPU: torch allocates outside Python's allocator, so ``tracemalloc`` sees nothing. Each
  (implementation, size) case instead runs in a fresh interpreter, which allocates the
  inputs, makes one tiny call to load kernels and start the thread pool, resets the kernel's
  peak-RSS counter (writing ``5`` to ``/proc/self/clear_refs``, Linux >= 4.0), makes the
  measured call, and reports the peak resident set size (``VmHWM`` in ``/proc/self/status``)
  minus the resident size before the call. ``getrusage(RUSAGE_SELF).ru_maxrss`` cannot be
  used: Linux carries a process's high-water mark across fork and exec, so every child
  would start at the benchmark process's own peak and report zero growth. The figure is
  whole-process, so it also counts allocator overhead and pages touched by BLAS
  workspaces, which is what a user's machine pays.
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the
  memory allocated before the call, in the benchmark process itself.

On CUDA the table's caption names the backend "ours" used, and when that is xformers a
second table compares it with SDPA forced through ``GENFORGE_ATTENTION=sdpa``.

Run: ``python eval/benchmarks/attention.py`` (about a minute on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

from genforge.core.attention import BACKEND_ENV_VAR, attention, attention_backend, naive_attention

IMPLEMENTATIONS = {"ours": attention, "naive": naive_attention}
MIB = 2**20


def make_inputs(tokens: int, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded q, k, v of shape (B, H, tokens, D)."""
    generator = torch.Generator().manual_seed(tokens)
    shape = (args.batch, args.heads, tokens, args.head_dim)
    dtype = getattr(torch, args.dtype)
    return tuple(torch.randn(shape, generator=generator).to(args.device, dtype) for _ in range(3))


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def median_ms(fn, inputs, args: argparse.Namespace) -> float:
    for _ in range(args.warmup):
        fn(*inputs)
    synchronize(args.device)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        fn(*inputs)
        synchronize(args.device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


@torch.inference_mode()
def cuda_peak_mib(fn, inputs, device: str) -> float:
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn(*inputs)
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / MIB


def proc_status_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM), in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line")


@torch.inference_mode()
def measure_rss_in_this_process(name: str, tokens: int, args: argparse.Namespace) -> None:
    """Child-process mode: print the peak RSS growth (MiB) of one call."""
    if not os.path.exists("/proc/self/clear_refs"):
        raise SystemExit("CPU peak-memory measurement needs Linux's /proc/self/clear_refs")
    fn = IMPLEMENTATIONS[name]
    inputs = make_inputs(tokens, args)
    fn(*make_inputs(16, args))
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM to the current resident size
    before_kib = proc_status_kib("VmRSS")
    fn(*inputs)
    print((proc_status_kib("VmHWM") - before_kib) / 1024)


def cpu_peak_mib(name: str, tokens: int, args: argparse.Namespace) -> float:
    """Peak RSS growth of one call, measured in a fresh interpreter (see module docstring)."""
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--measure-rss", name, str(tokens),
        "--batch", str(args.batch),
        "--heads", str(args.heads),
        "--head-dim", str(args.head_dim),
        "--dtype", args.dtype,
        "--threads", str(torch.get_num_threads()),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def peak_mib(name: str, tokens: int, inputs, args: argparse.Namespace) -> float:
    if torch.device(args.device).type == "cuda":
        return cuda_peak_mib(IMPLEMENTATIONS[name], inputs, args.device)
    return cpu_peak_mib(name, tokens, args)


def forced_sdpa(q, k, v):
    previous = os.environ.get(BACKEND_ENV_VAR)
    os.environ[BACKEND_ENV_VAR] = "sdpa"
    try:
        return attention(q, k, v)
    finally:
        if previous is None:
            del os.environ[BACKEND_ENV_VAR]
        else:
            os.environ[BACKEND_ENV_VAR] = previous


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--measure-rss", nargs=2, metavar=("IMPL", "TOKENS"), help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.measure_rss:
        args.device = "cpu"
        measure_rss_in_this_process(args.measure_rss[0], int(args.measure_rss[1]), args)
        return

    dtype = getattr(torch, args.dtype)
    backend = attention_backend(args.device, dtype)
    print(
        f"device={args.device} backend(ours)={backend} dtype={args.dtype} B={args.batch} H={args.heads} "
        f"D={args.head_dim} threads={torch.get_num_threads()} torch={torch.__version__} "
        f"median of {args.repeats} after {args.warmup} warm-up\n"
    )
    print("| tokens | ours ms | naive ms | time ratio (naive/ours) | ours peak MiB | naive peak MiB | memory ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for tokens in args.tokens:
        inputs = make_inputs(tokens, args)
        ours_ms = median_ms(attention, inputs, args)
        naive_ms = median_ms(naive_attention, inputs, args)
        ours_mib = peak_mib("ours", tokens, inputs, args)
        naive_mib = peak_mib("naive", tokens, inputs, args)
        print(
            f"| {tokens} | {ours_ms:.2f} | {naive_ms:.2f} | {naive_ms / ours_ms:.2f} | "
            f"{ours_mib:.1f} | {naive_mib:.1f} | {naive_mib / max(ours_mib, 1e-9):.1f} |"
        )

    if backend == "xformers":
        print("\n| tokens | xformers ms | sdpa ms | naive ms | sdpa/xformers | naive/xformers |")
        print("|---:|---:|---:|---:|---:|---:|")
        for tokens in args.tokens:
            inputs = make_inputs(tokens, args)
            xformers_ms = median_ms(attention, inputs, args)
            sdpa_ms = median_ms(forced_sdpa, inputs, args)
            naive_ms = median_ms(naive_attention, inputs, args)
            print(
                f"| {tokens} | {xformers_ms:.2f} | {sdpa_ms:.2f} | {naive_ms:.2f} | "
                f"{sdpa_ms / xformers_ms:.2f} | {naive_ms / xformers_ms:.2f} |"
            )


if __name__ == "__main__":
    main()
