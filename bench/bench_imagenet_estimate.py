"""Measure what an ImageNet-train comparison costs here, then estimate it on 1 and 8 GPUs (docs/distributed.md).

    python bench/bench_imagenet_estimate.py            # about 3 minutes on 2 CPU cores
    python bench/bench_imagenet_estimate.py --full-eigh  # also the full float64 eigh (minutes on a CPU)
    python bench/bench_imagenet_estimate.py --device cuda

Measured (on the device given; nothing here downloads weights, the models are randomly initialised):

1. FLOPs of one forward pass of each encoder, counted by ``torch.utils.flop_counter.FlopCounterMode``:
   open_clip ViT-B-32 image tower at 224 px, DINOv2 ViT-B/14 (timm) at 224 px and at its default 518 px.
2. CPU time to decode a 500 x 375 JPEG (the typical ImageNet size) and run each encoder's own preprocessing
   (``encoder.preprocess``, what the extraction's DataLoader workers do), per image on one core.
3. SPEC accumulation: ``DiffCovariance.update`` time per sample for 2,000 + 2,000 features (Gaussian RFF
   with 1,000 frequencies per side on 512-d and 768-d inputs) and for the preset's 4,000 + 4,000
   (``rff_dim=2000``); the solve (``compute()``, float64 eigh of D x D); the top-samples pass per sample.

Estimated (printed with its assumptions, nothing measured on a GPU unless ``--device cuda``): extraction
and SPEC time of 1,281,167 images on 1 and 8 GPUs.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time

import numpy as np
import torch
from PIL import Image

import spec_torch as st

N_IMAGENET_TRAIN = 1_281_167
#: assumptions of the GPU estimate (H200: the H100's compute, 141 GB HBM3e)
H200_BF16_DENSE_TFLOPS = 989.0
H200_FP32_TFLOPS = 67.0  # plain float32 (torch leaves TF32 matmul off by default)
ASSUMED_MFU = 0.35  # ViT-B inference in bf16 with fused attention, batch >= 256 (A100 timm numbers: ~0.34)
CPU_CORES_PER_GPU = 12  # decode workers per GPU on a typical 8-GPU node (~100 cores)
FEATURE_READ_GBPS = 2.0  # cached features read from local NVMe / page cache, per node


def _median_time(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def encoder_flops() -> dict[str, float]:
    """GFLOPs of one image through each encoder (multiply-add = 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    from spec_torch.apps.encoders import build_encoder

    out = {}
    encs = {
        "CLIP ViT-B-32 @224": build_encoder("open_clip", model="ViT-B-32", pretrained=None),
        "DINOv2 ViT-B/14 @224": build_encoder("timm", model="vit_base_patch14_dinov2", img_size=224),
        "DINOv2 ViT-B/14 @518": build_encoder("timm", model="vit_base_patch14_dinov2"),
    }
    for name, enc in encs.items():
        size = int(name.split("@")[1])
        x = torch.zeros(1, 3, size, size)
        counter = FlopCounterMode(display=False)
        enc.train()  # train mode: nn.MultiheadAttention's fused inference path hides its matmuls from the counter
        with counter, torch.no_grad():
            enc(x)
        enc.eval()
        out[name] = counter.get_total_flops() / 1e9
    return out, encs


def _jpeg(width: int = 500, height: int = 375) -> bytes:
    """A photo-like JPEG: smooth gradients plus texture (about the byte size of an ImageNet image)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx / width, yy / height, (xx + yy) / (width + height)], -1) * 200
    img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def decode_ms(encs: dict) -> tuple[dict[str, float], int]:
    """Milliseconds of one core to decode the JPEG and preprocess it for each encoder."""
    data = _jpeg()
    torch.set_num_threads(1)
    out = {}
    for name, enc in encs.items():

        def one(enc=enc):
            with Image.open(io.BytesIO(data)) as im:
                enc.preprocess(im.convert("RGB"))

        out[name] = 1e3 * _median_time(one, 30, torch.device("cpu"))
    return out, len(data)


def _spec_cost(rff: int, n: int, device: torch.device, full_eigh: bool) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 512, generator=g).to(device)  # CLIP ViT-B-32 embeddings are 512-d
    y = torch.randn(n, 768, generator=g).to(device)  # DINOv2 ViT-B/14: 768-d
    kx = st.GaussianKernel(sigma=20.0, rff_dim=rff, seed=0)
    ky = st.GaussianKernel(sigma=25.0, rff_dim=rff, seed=1)
    batches = list(zip(x.split(1024), y.split(1024)))

    def accumulate() -> st.DiffCovariance:
        acc = st.DiffCovariance(kx, ky, device=device)
        for xb, yb in batches:
            acc.update(xb, yb)
        return acc

    accumulate()  # warm-up
    t_acc = _median_time(accumulate, 3, device) / n
    acc = accumulate()
    t0 = time.perf_counter()
    res = acc.compute(top_k=None if full_eigh else 10)  # the whole spectrum, or 10 modes of each sign
    t_solve = time.perf_counter() - t0
    modes = res.positive_modes(5) + res.negative_modes(5)
    t_score = _median_time(lambda: res.top_samples(batches, k=25, modes=modes), 3, device) / n
    return {"acc_s": t_acc, "solve_s": t_solve, "score_s": t_score, "n": n}


def spec_costs(device: torch.device, threads: int, full_eigh: bool) -> dict[str, dict[str, float]]:
    """Seconds per sample of the accumulation and the scoring pass, and of the solve, for two sizes of D."""
    torch.set_num_threads(threads)
    sizes = ((1000, 8192), (2000, 4096))
    return {f"{2 * rff} + {2 * rff}": _spec_cost(rff, n, device, full_eigh) for rff, n in sizes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument(
        "--full-eigh",
        action="store_true",
        help="time the full eigh (compare's default solve_top_k=null; minutes on a CPU) instead of top 10",
    )
    args = parser.parse_args()
    device = torch.device(args.device)

    flops, encs = encoder_flops()
    print("1. encoder forward FLOPs (FlopCounterMode, random weights, batch 1)")
    for name, gf in flops.items():
        print(f"   {name:24s} {gf:7.1f} GFLOP/image")
    ms, nbytes = decode_ms(encs)
    print(f"2. decode a {nbytes / 1024:.0f} KiB 500x375 JPEG + the encoder's preprocess, one CPU core")
    for name, t in ms.items():
        print(f"   {name:24s} {t:7.2f} ms/image")
    costs = spec_costs(device, args.threads, args.full_eigh)
    solve = "full eigh" if args.full_eigh else "top 10 each sign"
    print(f"3. SPEC on {device} ({args.threads} threads), float32 sums, Gaussian RFF on 512-d + 768-d")
    for d, c in costs.items():
        print(
            f"   D = {d:13s} accumulate {1e6 * c['acc_s']:8.1f} us/sample  ({1 / c['acc_s']:8.0f} samples/s, "
            f"n = {c['n']})   solve ({solve}) {c['solve_s']:6.1f} s   top-samples pass {1e6 * c['score_s']:6.1f} us/sample"
        )

    # ------------------------------------------------------------------------- the estimate (not measured)
    print(f"\nESTIMATE for ImageNet-train, n = {N_IMAGENET_TRAIN:,} (assumptions in the lines below)")
    eff = H200_BF16_DENSE_TFLOPS * ASSUMED_MFU
    print(
        f"   GPU: H200, {H200_BF16_DENSE_TFLOPS:.0f} TFLOP/s bf16 dense peak x MFU {ASSUMED_MFU} = {eff:.0f} TFLOP/s;"
        f" {CPU_CORES_PER_GPU} decode cores per GPU; features read at {FEATURE_READ_GBPS} GB/s"
    )
    for dino in ("DINOv2 ViT-B/14 @224", "DINOv2 ViT-B/14 @518"):
        total = {}
        for gpus in (1, 8):
            n = N_IMAGENET_TRAIN / gpus
            ext = 0.0
            for name in ("CLIP ViT-B-32 @224", dino):
                gpu_rate = eff * 1e12 / (flops[name] * 1e9)  # images/s the GPU sustains
                cpu_rate = CPU_CORES_PER_GPU / (ms[name] / 1e3)  # images/s the decode workers sustain
                ext += n / min(gpu_rate, cpu_rate)  # the two encoders run one after the other
            c = costs["4000 + 4000"]
            # GPU accumulation: 2 (Dx^2 + Dx Dy + Dy^2) FLOPs/sample at FP32 x 0.7, or the CPU-measured rate
            d = 4000
            gpu_acc = 2 * 3 * d * d / (H200_FP32_TFLOPS * 0.7 * 1e12)
            acc = c["acc_s"] if device.type == "cuda" else gpu_acc
            # two passes over all cached rows: the node's disk / page cache is shared by its GPUs
            read = 2 * N_IMAGENET_TRAIN * (512 + 768) * 4 / (FEATURE_READ_GBPS * 1e9)
            solve = c["solve_s"] if device.type == "cuda" else 10.0  # assumed: float64 eigh, 8000 x 8000, GPU
            spec_t = n * acc + read + solve + n * (c["score_s"] if device.type == "cuda" else acc / 10)
            total[gpus] = (ext, spec_t)
        for gpus, (ext, spec_t) in total.items():
            print(
                f"   CLIP ViT-B-32 vs {dino}, {gpus} GPU(s): extraction {ext / 60:6.1f} min, "
                f"SPEC (D = 4000 + 4000) {spec_t:6.1f} s"
            )


if __name__ == "__main__":
    main()
