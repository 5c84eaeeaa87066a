"""Benchmark of the self-verifying feature cache: what the checksums and the listing key cost.

Measured side by side in one run (the machine is shared and noisy); ratios are what to read.

1. Extraction of a synthetic image set with the offline colour encoder (the cheapest encoder there is, so
   the checksum share printed is an upper bound: a real network is 100-1000x slower per image), against
   the checksum work done for the same rows (chunk hashes while writing + block hashes when finishing) and
   the verification on reuse (one read + blake2b of ``features.npy``).
2. blake2b throughput on a larger array, and what verifying an ImageNet-train-sized cache (1.28M x 768
   float32, 3.9 GB) on reuse would take at that rate.
3. The MS-COCO cache key over the image listing: ``os.stat`` of 118,287 files (train2017), against hashing
   only the annotation file's stamp.

    python bench/bench_cache.py            # full
    python bench/bench_cache.py --quick    # smaller
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from spec_torch.apps.data import build_dataset
from spec_torch.apps.data.base import file_stamps
from spec_torch.apps.encoders import build_encoder
from spec_torch.apps.extract import FeatureCache, _digest_range, _feature_checksums, extract_features


def _median(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_extraction(n: int, reps: int) -> float:
    ds = build_dataset("synthetic", n=n, image_size=64)
    enc = build_encoder("offline_colour")
    with tempfile.TemporaryDirectory() as tmp:
        t_extract = []
        cache = None
        for r in range(reps):
            t0 = time.perf_counter()
            cache = extract_features(
                ds, enc, Path(tmp) / f"c{r}", batch_size=64, progress=False, chunk_rows=256
            )
            t_extract.append(time.perf_counter() - t0)
        assert cache is not None
        path = cache.path / "features.npy"
        nbytes = path.stat().st_size

        def hash_all() -> None:  # chunk hashes while writing + block hashes at the end: two passes
            _feature_checksums(path, cache.n, cache.dim)
            fd = os.open(path, os.O_RDONLY)
            try:
                _digest_range(fd, 0, nbytes)
            finally:
                os.close(fd)

        t_hash = _median(hash_all, reps)
        t_load = _median(lambda: FeatureCache.load(cache.path, verify=False), reps)
        t_verify = _median(lambda: FeatureCache.load(cache.path, verify=True), reps)
    t_ex = statistics.median(t_extract)
    print(f"extraction: {n} images x {cache.dim} features (offline colour encoder, CPU)")
    print(f"  extract (checksums included)      {t_ex * 1e3:9.1f} ms")
    print(f"  checksum work of one extraction   {t_hash * 1e3:9.1f} ms   = {t_hash / t_ex:.2%} of extraction")
    print(f"  reuse, load only                  {t_load * 1e3:9.1f} ms")
    print(
        f"  reuse, load + verify              {t_verify * 1e3:9.1f} ms   = {t_verify / t_ex:.2%} of extraction"
    )
    return t_ex / n


def bench_throughput(mb: int, reps: int, per_image_s: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.bin"
        path.write_bytes(np.random.default_rng(0).random(mb * (1 << 20) // 8).tobytes())
        fd = os.open(path, os.O_RDONLY)
        try:
            t = _median(lambda: _digest_range(fd, 0, path.stat().st_size), reps)
        finally:
            os.close(fd)
    rate = mb / 1024 / t  # GiB/s
    imagenet = 1_281_167 * 768 * 4 / 2**30
    print(f"blake2b over {mb} MiB (page cache): {rate:.2f} GiB/s")
    row_s = 768 * 4 / 2**30 / rate * 2  # hashed twice: chunk while writing, block when finishing
    print(
        f"  per 768-d float32 row: {row_s * 1e6:.1f} us of hashing vs {per_image_s * 1e3:.1f} ms to extract one image "
        f"with the cheapest encoder ({row_s / per_image_s:.3%})"
    )
    print(
        f"  verify an ImageNet-train cache ({imagenet:.1f} GiB) on reuse: ~{imagenet / rate:.1f} s "
        "(+ the disk read when not cached), against hours of extraction"
    )


def bench_listing(n_files: int, reps: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = [f"{i:012d}.jpg" for i in range(n_files)]
        for name in names:
            (root / name).touch()
        ann = root / "captions.json"
        ann.write_text("{}")

        def annotation_only() -> None:
            st = ann.stat()
            _ = f"{st.st_size}:{st.st_mtime_ns}"

        t_ann = _median(annotation_only, reps)
        t_list = _median(lambda: file_stamps(root, names), reps)
    print(f"COCO cache key over the image listing: {n_files} files (os.stat each, warm cache)")
    print(f"  annotation stamp only  {t_ann * 1e3:9.3f} ms")
    print(f"  + listing stamps       {t_list * 1e3:9.1f} ms   ({t_list / n_files * 1e6:.2f} us per image)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    reps = 3
    per_image = bench_extraction(256 if args.quick else 1024, reps)
    bench_throughput(64 if args.quick else 512, reps, per_image)
    bench_listing(20_000 if args.quick else 118_287, reps)


if __name__ == "__main__":
    main()
