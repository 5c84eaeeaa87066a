"""Benchmarks of the SPEC core, printed as ratios measured side by side in one run (the machine is noisy).

    python bench/bench_core.py                # the full set (a few minutes on 2 CPU cores)
    python bench/bench_core.py --quick        # small sizes, a smoke run
    python bench/bench_core.py --device cuda  # on a GPU

1. Accumulation throughput: ``DiffCovariance.update`` (validation + three block GEMMs) against one
   ``torch.matmul`` of the same shapes and dtype (``[D, B] @ [B, D]``, D = Dx + Dy), repetitions interleaved,
   medians; for float64 statistics (the default) and float32 (``accumulate_dtype=torch.float32``).
2. The reference implementation's accumulation (per-sample outer products summed with ``bmm``, batches of 256)
   against ``DiffCovariance`` on the same features at the same dtype: n = 4,000, 2,000 features per side.
3. End to end (random features streamed from a seeded generator, 768-d and 512-d inputs, Gaussian RFF with
   1,000 frequencies per side, top 20 modes of each sign, then the top-samples pass) at n = 25k, 50k, 100k,
   each in a fresh subprocess so its peak resident memory is its own, with float64 statistics (default) and
   float32: the cost ratio float64 / float32.
4. Accuracy of each on the close-model case of issue 8 (``y = x + 1e-4 noise``, n = 3000, p = 256, float32
   input, cosine kernels) against the dense float64 eigh of L in numpy.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from _timing import sync, timed

import spec_torch as st


def bench_throughput(device: torch.device, batch: int, dx: int, dy: int, reps: int) -> None:
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float64, torch.float32):
        x = torch.randn(batch, dx, generator=g).to(
            device
        )  # [B, Dx] float32 features (linear: phi = identity)
        y = torch.randn(batch, dy, generator=g).to(device)  # [B, Dy]
        p = torch.cat([x, y], dim=1).to(dtype)  # [B, D], already in the statistics' dtype
        acc = st.DiffCovariance("linear", "linear", accumulate_dtype=dtype)
        acc.update(x, y)  # allocate the state; warm-up (float32 input, cast to the statistics' dtype inside)
        torch.matmul(p.T, p)
        t_acc, t_mm = [], []
        for _ in range(reps):  # interleaved so both see the same machine load
            t_acc.append(timed(functools.partial(acc.update, x, y), device))
            t_mm.append(timed(functools.partial(torch.matmul, p.T, p), device))
        a, m = statistics.median(t_acc), statistics.median(t_mm)
        name = str(dtype).replace("torch.", "")
        print(
            f"[1] accumulation in {name}, B={batch}, Dx={dx}, Dy={dy} on {device}: update {a * 1e3:.1f} ms, "
            f"one {name} matmul [D,B]@[B,D] {m * 1e3:.1f} ms (medians of {reps})"
        )
        print(
            f"    throughput as a fraction of one matmul of the same shapes and dtype: {m / a:.2f}  (target >= 0.8)"
        )


def _reference_accumulate(px: torch.Tensor, py: torch.Tensor, batch: int = 256):
    """The reference implementation's way: per-sample outer products with bmm, summed, per batch."""
    dx, dy = px.shape[1], py.shape[1]
    xx = torch.zeros(dx, dx, device=px.device, dtype=px.dtype)
    xy = torch.zeros(dx, dy, device=px.device, dtype=px.dtype)
    yy = torch.zeros(dy, dy, device=px.device, dtype=px.dtype)
    for a, b in zip(px.split(batch), py.split(batch)):
        xx += torch.bmm(a.unsqueeze(2), a.unsqueeze(1)).sum(0)  # [B, Dx, 1] @ [B, 1, Dx] -> [B, Dx, Dx]
        xy += torch.bmm(a.unsqueeze(2), b.unsqueeze(1)).sum(0)
        yy += torch.bmm(b.unsqueeze(2), b.unsqueeze(1)).sum(0)
    return xx, xy, yy


def bench_reference(device: torch.device, n: int, d: int, batch: int = 256, dtype=torch.float32) -> None:
    g = torch.Generator().manual_seed(1)
    px = torch.randn(n, d, generator=g, dtype=dtype).to(device)
    py = torch.randn(n, d, generator=g, dtype=dtype).to(device)

    def ours():
        acc = st.DiffCovariance("linear", "linear", accumulate_dtype=dtype)
        for a, b in zip(px.split(batch), py.split(batch)):
            acc.update(a, b)
        return acc

    ours()  # warm-up
    t_ours = timed(ours, device)
    t_ref = timed(lambda: _reference_accumulate(px, py, batch), device)
    t_ours2 = timed(ours, device)  # again after the reference, so both saw the same load
    t_ours = min(t_ours, t_ours2)
    ref = _reference_accumulate(px[:512], py[:512], batch)
    mine = st.DiffCovariance("linear", "linear", accumulate_dtype=dtype).update(px[:512], py[:512])
    err = max(float((r - m).abs().max()) for r, m in zip(ref, (mine.xx, mine.xy, mine.yy)))
    print(
        f"[2] n={n}, {d} features per side, batches of {batch}, both in {str(dtype).replace('torch.', '')}: "
        f"reference (bmm outer products) {t_ref:.2f} s, "
        f"DiffCovariance {t_ours:.3f} s -> {t_ref / t_ours:.0f}x faster (target >= 50x); max |diff| of the sums "
        f"on 512 rows {err:.1e}"
    )


def _stream(n: int, p: int, q: int, batch: int, seed: int, device: torch.device):
    """Seeded batches of correlated embeddings, generated on the fly (never all n rows at once)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(p, q, generator=g) / p**0.5
    for start in range(0, n, batch):
        b = min(batch, n - start)
        x = torch.randn(b, p, generator=g)
        y = x @ mix + 0.5 * torch.randn(b, q, generator=g)
        yield x.to(device), y.to(device)


def _peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM (reset by exec, unlike ru_maxrss, which keeps the peak of the
    forked parent), falling back to ru_maxrss where /proc is absent."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def end_to_end(n: int, device: str, rff: int, top_k: int, batch: int, dtype: str = "float64") -> dict:
    """One end-to-end run; returns timings and this process's peak resident memory."""
    dev = torch.device(device)
    p, q = 768, 512
    acc = st.DiffCovariance(
        st.GaussianKernel(sigma="auto", rff_dim=rff, seed=0),
        st.GaussianKernel(sigma="auto", rff_dim=rff, seed=1),
        accumulate_dtype=getattr(torch, dtype),
    )
    acc.fit(*next(_stream(min(n, 2000), p, q, 2000, 0, dev)))  # sigma from a sample, as st.spec does
    t0 = time.perf_counter()
    for xb, yb in _stream(n, p, q, batch, 0, dev):
        acc.update(xb, yb)
    sync(dev)
    t1 = time.perf_counter()
    res = acc.compute(eta=1.0, top_k=top_k)
    sync(dev)
    t2 = time.perf_counter()
    modes = res.positive_modes(top_k) + res.negative_modes(top_k)
    res.top_samples(_stream(n, p, q, batch, 0, dev), k=20, modes=modes)
    sync(dev)
    t3 = time.perf_counter()
    peak = _peak_rss_bytes()
    gpu_peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
    return {
        "n": n,
        "accumulate_s": t1 - t0,
        "solve_s": t2 - t1,
        "score_s": t3 - t2,
        "total_s": t3 - t0,
        "peak_rss_bytes": peak,
        "gpu_peak_bytes": gpu_peak,
        "spec_diff": res.spec_diff,
    }


def bench_end_to_end(device: str, sizes: list[int], rff: int, top_k: int, batch: int) -> None:
    rows, rows32 = [], []
    for n, dtype in ((n, dt) for n in sizes for dt in ("float64", "float32")):
        cmd = [
            sys.executable,
            __file__,
            "--one",
            str(n),
            "--device",
            device,
            "--rff",
            str(rff),
            "--top-k",
            str(top_k),
            "--batch",
            str(batch),
            "--dtype",
            dtype,
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        (rows if dtype == "float64" else rows32).append(json.loads(out.strip().splitlines()[-1]))
    print(
        f"[3] end to end on {device}: inputs 768-d and 512-d, Gaussian RFF {rff} frequencies per side "
        f"(D = {4 * rff}), top {top_k} modes of each sign, top-20 samples pass; float64 statistics (default)"
    )
    print(
        f"    {'n':>8} {'accumulate s':>13} {'solve s':>8} {'score s':>8} {'total s':>8} {'us/sample':>10} "
        f"{'peak RSS MiB':>13}" + (f" {'GPU peak MiB':>13}" if device.startswith("cuda") else "")
    )
    for r in rows:
        line = (
            f"    {r['n']:>8} {r['accumulate_s']:>13.2f} {r['solve_s']:>8.2f} {r['score_s']:>8.2f} "
            f"{r['total_s']:>8.2f} {1e6 * (r['accumulate_s'] + r['score_s']) / r['n']:>10.1f} "
            f"{r['peak_rss_bytes'] / 2**20:>13.0f}"
        )
        if device.startswith("cuda"):
            line += f" {r['gpu_peak_bytes'] / 2**20:>13.0f}"
        print(line)
    a, b = rows[0], rows[-1]
    grow_n = b["n"] / a["n"]
    grow_t = (b["accumulate_s"] + b["score_s"]) / (a["accumulate_s"] + a["score_s"])
    print(
        f"    n grew {grow_n:.0f}x: streaming time (accumulate + score) grew {grow_t:.2f}x (linear: {grow_n:.0f}x), "
        f"total with the fixed-cost solve {b['total_s'] / a['total_s']:.2f}x; "
        f"peak RSS grew {b['peak_rss_bytes'] / a['peak_rss_bytes']:.2f}x (independent of n: ~1x)"
    )
    print("    cost of float64 against float32 statistics (one run each):")
    print(
        f"    {'n':>8} {'f64 total s':>12} {'f32 total s':>12} {'ratio':>6} {'f64 accumulate s':>17} {'f32':>6}"
    )
    for r64, r32 in zip(rows, rows32, strict=True):
        print(
            f"    {r64['n']:>8} {r64['total_s']:>12.2f} {r32['total_s']:>12.2f} "
            f"{r64['total_s'] / r32['total_s']:>6.2f} {r64['accumulate_s']:>17.2f} {r32['accumulate_s']:>6.2f}"
        )


def bench_close_model_accuracy(n: int = 3000, p: int = 256) -> None:
    """Issue 8's close-model case: relative error of SPEC-diff for float64 and float32 statistics."""
    import numpy as np

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, p, generator=g)
    y = x + 1e-4 * torch.randn(n, p, generator=g)  # float32 input
    xn = x.double().numpy() / np.linalg.norm(x.double().numpy(), axis=1, keepdims=True)
    yn = y.double().numpy() / np.linalg.norm(y.double().numpy(), axis=1, keepdims=True)
    ref = float(np.abs(np.linalg.eigvalsh((xn @ xn.T - yn @ yn.T) / n)).max())  # dense float64 oracle
    print(
        f"[4] close models (y = x + 1e-4 noise, n={n}, p={p}, float32 input, cosine): oracle SPEC-diff {ref:.4g}"
    )
    for dtype in (torch.float64, torch.float32):
        res = st.spec(x, y, method="features", accumulate_dtype=dtype)
        live = res.positive_modes(1) + res.negative_modes(1)
        print(
            f"    {str(dtype).replace('torch.', ''):>8} statistics: SPEC-diff {res.spec_diff:.4g}, relative error "
            f"{abs(res.spec_diff / ref - 1):.1e}, noise level (zero cut-off) {res.zero_tol:.2g}, "
            f"modes reported: {'yes' if live else 'none (below the noise level)'}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run in seconds")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--rff", type=int, default=1000)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--dtype", default="float64", help=argparse.SUPPRESS)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: 1,2,3,4")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(end_to_end(args.one, args.device, args.rff, args.top_k, args.batch, args.dtype)))
        return
    device = torch.device(args.device)
    skip = set(args.skip.split(",")) - {""}
    print(
        f"spec_torch {st.__version__}, torch {torch.__version__}, device {device}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs"
    )
    if args.quick:
        if "1" not in skip:
            bench_throughput(device, batch=512, dx=256, dy=256, reps=3)
        if "2" not in skip:
            bench_reference(device, n=512, d=128)
        if "3" not in skip:
            bench_end_to_end(args.device, [2000, 4000], rff=64, top_k=4, batch=1024)
        if "4" not in skip:
            bench_close_model_accuracy(n=600, p=64)
        return
    if "1" not in skip:
        bench_throughput(device, batch=4096, dx=2000, dy=2000, reps=5)
    if "2" not in skip:
        bench_reference(device, n=4000, d=2000)
    if "4" not in skip:
        bench_close_model_accuracy()
    if "3" not in skip:
        bench_end_to_end(
            args.device, [25_000, 50_000, 100_000], rff=args.rff, top_k=args.top_k, batch=args.batch
        )


if __name__ == "__main__":
    main()
