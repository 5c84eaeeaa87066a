"""Benchmark of SpecAlignLoss: overhead on a student's training step, cost vs batch size and feature dimension,
exact eigh vs the warm-started iterative solver, float64 (default) vs float32 internal math. Times are medians of interleaved repetitions, measured side by
side in one run (the machine is shared and noisy); ratios are what to read.

    python bench/bench_loss.py            # full
    python bench/bench_loss.py --quick    # a smaller, faster run
    python bench/bench_loss.py --threads 1
    python bench/bench_loss.py --quick --only dtype solver   # some sections only

On CUDA the student is open_clip ViT-B-32 (random init) at batch 256 under bf16 autocast; on CPU a small ViT
(timm vit_tiny_patch16_224 at 64x64 input) at batch 64. The teacher's features are random, 768-d (DINOv2-B).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from _timing import timed

from spec_torch import SpecAlignLoss


def interleaved(
    fns: dict[str, Callable[[], object]], reps: int, device: torch.device, warmup: int = 2
) -> dict:
    """Median seconds of each function, running them in turn ``reps`` times (after ``warmup`` rounds)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(warmup + reps):
        for name, fn in fns.items():
            t = timed(fn, device)
            if rep >= warmup:
                times[name].append(t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _student(device: torch.device) -> tuple[torch.nn.Module, torch.Tensor, str]:
    if device.type == "cuda":
        import open_clip

        model = open_clip.create_model("ViT-B-32", pretrained=None).visual.to(device)
        images = torch.randn(256, 3, 224, 224, device=device)
        return model, images, "open_clip ViT-B-32 image tower, batch 256, bf16 autocast"
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=0)
    images = torch.randn(64, 3, 64, 64)
    return model, images, "timm vit_tiny_patch16_224 at 64x64, batch 64, float32"


def bench_overhead(device: torch.device, reps: int) -> None:
    """SpecAlignLoss forward+backward vs one training step of the student (forward, backward, AdamW step)."""
    model, images, what = _student(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with torch.no_grad(), amp:
        d_student = model(images[:2]).shape[1]
    teacher = torch.randn(images.shape[0], 768, device=device)
    losses = {
        "op": SpecAlignLoss(norm="op"),
        "op, iterative": SpecAlignLoss(norm="op", solver="iterative"),
        "topk (k=5)": SpecAlignLoss(norm="topk", k=5),
        "fro": SpecAlignLoss(norm="fro"),
    }
    feats = torch.randn(images.shape[0], d_student, device=device)

    def train_step() -> None:  # the student's step with a trivial loss on its features
        opt.zero_grad(set_to_none=True)
        with amp:
            out = model(images)
        out.float().square().mean().backward()
        opt.step()

    def loss_step(fn: SpecAlignLoss) -> Callable[[], None]:
        def run() -> None:
            f = (feats + 0.01 * torch.randn_like(feats)).requires_grad_()  # a slowly moving student
            fn(f, teacher).backward()

        return run

    fns = {"train step": train_step} | {name: loss_step(fn) for name, fn in losses.items()}
    med = interleaved(fns, reps, device)
    print(f"\n## Overhead on one training step: {what}; student {d_student}-d, teacher 768-d, cosine kernels")
    print(
        f"train step (fwd+bwd+AdamW, no SpecAlignLoss): {1e3 * med['train step']:.1f} ms (median of {reps})"
    )
    for name in losses:
        print(
            f"SpecAlignLoss {name:<14} fwd+bwd {1e3 * med[name]:8.2f} ms = "
            f"{100 * med[name] / med['train step']:5.1f}% of the step (target <= 5%)"
        )


def _loss_call(fn: SpecAlignLoss, b: int, ds: int, dt: int, device: torch.device) -> Callable[[], None]:
    g = torch.Generator(device=device).manual_seed(0)
    base = torch.randn(b, ds, device=device, generator=g)
    teacher = torch.randn(b, dt, device=device, generator=g)

    def run() -> None:
        f = (base + 0.01 * torch.randn_like(base)).requires_grad_()
        fn(f, teacher).backward()

    return run


def bench_batch_size(device: torch.device, reps: int, sizes: list[int], ds: int, dt: int) -> None:
    print(f"\n## Cost vs batch size B (ds={ds}, dt={dt}, D={ds + dt}; norm='op'; ms per fwd+bwd, median)")
    print(f"{'B':>6} {'exact BxB':>10} {'features DxD':>13} {'auto':>8} {'iterative':>10}")
    for b in sizes:
        fns = {
            m: _loss_call(SpecAlignLoss(method=m), b, ds, dt, device) for m in ("exact", "features", "auto")
        }
        fns["iterative"] = _loss_call(SpecAlignLoss(solver="iterative"), b, ds, dt, device)
        med = interleaved(fns, reps, device)
        print(f"{b:>6} " + " ".join(f"{1e3 * med[k]:>{w}.2f}" for k, w in zip(fns, (10, 13, 8, 10))))


def bench_feature_dim(device: torch.device, reps: int, dims: list[int], b: int) -> None:
    print(f"\n## Cost vs feature dimension (B={b}, ds = dt = d; norm='op'; ms per fwd+bwd, median)")
    print(f"{'d':>6} {'D':>6} {'exact BxB':>10} {'features DxD':>13} {'auto':>8} {'iterative':>10}")
    for d in dims:
        fns = {m: _loss_call(SpecAlignLoss(method=m), b, d, d, device) for m in ("exact", "features", "auto")}
        fns["iterative"] = _loss_call(SpecAlignLoss(solver="iterative"), b, d, d, device)
        med = interleaved(fns, reps, device)
        print(
            f"{d:>6} {2 * d:>6} " + " ".join(f"{1e3 * med[k]:>{w}.2f}" for k, w in zip(fns, (10, 13, 8, 10)))
        )


def bench_solver(device: torch.device, reps: int, b: int, ds: int, dt: int, steps: int) -> None:
    """A training-like sequence (features drift slowly): eigh vs the warm-started Krylov solver."""
    print(
        f"\n## Exact eigh vs warm-started iterative solver (B={b}, ds={ds}, dt={dt}; {steps} drifting batches)"
    )
    g = torch.Generator(device=device).manual_seed(1)
    lab = torch.arange(b, device=device) % 8
    base = torch.randn(8, ds, device=device, generator=g)[lab] + torch.randn(
        b, ds, device=device, generator=g
    )
    teacher = torch.randn(5, dt, device=device, generator=g)[lab % 5] + torch.randn(
        b, dt, device=device, generator=g
    )
    batches = [base + 0.02 * torch.randn(b, ds, device=device, generator=g) for _ in range(steps)]
    for norm in ("op", "topk"):
        for method in ("exact", "features"):
            fns, values = {}, {"eigh": [], "iterative": []}
            losses = {s: SpecAlignLoss(norm=norm, k=5, solver=s, method=method) for s in values}
            used: list[str] = []

            def make(solver: str, fn: SpecAlignLoss, out: list, used: list) -> Callable[[], None]:
                def run() -> None:
                    f = batches[len(out) % steps].requires_grad_()
                    value = fn(f, teacher)
                    value.backward()
                    f.grad = None
                    out.append(float(value.detach()))
                    used.append(fn.last_solver)

                return run

            fns = {s: make(s, losses[s], values[s], used if s == "iterative" else []) for s in values}
            med = interleaved(fns, min(reps * 3, steps - 1), device, warmup=1)
            frac = used.count("iterative") / max(1, len(used))
            err = max(abs(a - e) / abs(e) for a, e in zip(values["iterative"], values["eigh"]))
            print(
                f"norm={norm:<5} method={method:<9} eigh {1e3 * med['eigh']:8.2f} ms, iterative "
                f"{1e3 * med['iterative']:8.2f} ms (eigh/iterative = {med['eigh'] / med['iterative']:.1f}); "
                f"iterative converged in {100 * frac:.0f}% of calls; max relative value difference {err:.1e}"
            )


def _close(b: int, p: int, delta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 student = teacher + delta noise (a SPEC-diff of about 0.054 delta at B=256, p=32)."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(b, p, generator=g, dtype=torch.float64)
    s = t + delta * torch.randn(b, p, generator=g, dtype=torch.float64)
    return s.float().to(device), t.float().to(device)


def bench_dtype(device: torch.device, reps: int, sizes: list[int], ds: int, dt: int) -> None:
    """float64 internals (the default) vs the float32 fast path: step time side by side, and accuracy."""
    print(
        f"\n## float64 (default) vs float32 internal math: fwd+bwd on float32 features (ds={ds}, dt={dt}, "
        "norm='op', median ms)"
    )
    print(f"{'B':>6} {'route':>9} {'float64':>9} {'float32':>9} {'float64/float32':>16}")
    for b in sizes:
        for method in ("exact", "features"):
            fns = {
                name: _loss_call(SpecAlignLoss(method=method, dtype=dtype), b, ds, dt, device)
                for name, dtype in (("float64", torch.float64), ("float32", torch.float32))
            }
            med = interleaved(fns, reps, device)
            print(
                f"{b:>6} {method:>9} {1e3 * med['float64']:>9.2f} {1e3 * med['float32']:>9.2f} "
                f"{med['float64'] / med['float32']:>16.2f}"
            )
    print("\nAccuracy on close models (B=256, p=32, float32 inputs; relative error vs numpy float64 eigh):")
    print(
        f"{'SPEC-diff':>10} {'f64 auto':>9} {'f64 exact':>10} {'f32 exact':>10} {'f32 features':>13} "
        f"{'f32 features, no guard':>23}"
    )
    import numpy as np

    def unguarded(s: torch.Tensor, t: torch.Tensor) -> float:
        """The float32 features route without its float64 re-solve."""
        fn = SpecAlignLoss(method="features", dtype=torch.float32)
        fn._needs_float64 = lambda *args: False  # type: ignore[method-assign]
        return float(fn(s, t))

    for delta in (1.85e-4, 4.4e-4, 2.05e-3, 2e-2):
        s, t = _close(256, 32, delta, device)
        a = torch.nn.functional.normalize(s.double(), dim=1).cpu().numpy()
        b = torch.nn.functional.normalize(t.double(), dim=1).cpu().numpy()
        ref = float(np.abs(np.linalg.eigvalsh((a @ a.T - b @ b.T) / 256)).max())
        values = [
            float(SpecAlignLoss(method=m, dtype=d)(s, t))
            for m, d in (
                ("auto", torch.float64),
                ("exact", torch.float64),
                ("exact", torch.float32),
                ("features", torch.float32),
            )
        ] + [unguarded(s, t)]
        errs = [abs(v - ref) / ref for v in values]
        print(f"{ref:>10.2e} " + " ".join(f"{e:>{w}.1e}" for e, w in zip(errs, (9, 10, 10, 13, 23))))


_SECTIONS = ("overhead", "dtype", "batch", "dim", "solver")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=_SECTIONS,
        default=list(_SECTIONS),
        help="run only these sections (default: all)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    reps = 3 if args.quick else 7
    print(
        f"# SpecAlignLoss benchmark on {device} (torch {torch.__version__}, {torch.get_num_threads()} threads)"
    )
    quick = args.quick
    runs = {
        "overhead": lambda: bench_overhead(device, reps),
        "dtype": lambda: bench_dtype(
            device, reps, [256, 1024] if quick else [256, 1024, 4096], *((192, 384) if quick else (512, 768))
        ),
        "batch": lambda: bench_batch_size(
            device,
            reps,
            [64, 256, 1024] if quick else [64, 128, 256, 512, 1024, 2048],
            *((192, 384) if quick else (512, 768)),
        ),
        "dim": lambda: bench_feature_dim(
            device, reps, [32, 128, 512] if quick else [32, 128, 256, 512, 1024], 256
        ),
        "solver": lambda: bench_solver(
            device, reps, *((512, 192, 256) if quick else (1024, 512, 768)), steps=12 if quick else 40
        ),
    }
    for name in _SECTIONS:
        if name in args.only:
            runs[name]()


if __name__ == "__main__":
    main()
