"""Peak memory of feature extraction on an image folder, with and without a pixel bomb (issue 19).

The same extraction (torchvision resnet18, random weights, image size 32: ``Resize(37)`` then a 32 x 32
crop) runs in a fresh process on three folders: ordinary images; the same plus a 1,000,000 x 1 PNG (3 KB,
37 x 37,000,000 pixels once resized: past 3 GB before the aspect-ratio cap); the same plus an image at the
cap (32:1). Each prints its peak resident memory (``ru_maxrss``) and the ratio to the ordinary run:

    python bench/pixel_bomb.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
_RUN = """
import resource, sys, warnings
from spec_torch.apps.data import build_dataset
from spec_torch.apps.encoders import build_encoder
from spec_torch.apps.extract import extract_features
warnings.simplefilter("ignore")
ds = build_dataset("imagefolder", root=sys.argv[1])
enc = build_encoder("torchvision", model="resnet18", image_size=32)
cache = extract_features(ds, enc, sys.argv[2], batch_size=4, progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, len(cache.skipped))
"""


def _peak(root: Path, cache: Path) -> tuple[int, int]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", _RUN, str(root), str(cache)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout.split()
    return int(out[0]), int(out[1])


def main() -> None:
    from spec_torch.apps.data.base import MAX_ASPECT_RATIO

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folders = {}
        for case in ("ordinary", "with a 1,000,000 x 1 PNG", f"with a {MAX_ASPECT_RATIO}:1 image"):
            folder = tmp / str(len(folders))
            folder.mkdir()
            for k in range(8):
                Image.new("RGB", (64, 48), (30 * k, 90, 200 - 20 * k)).save(folder / f"im{k}.png")
            if "1,000,000" in case:
                Image.new("L", (1_000_000, 1)).save(folder / "bomb.png")
            elif ":1" in case:
                Image.new("RGB", (MAX_ASPECT_RATIO * 100, 100), (9, 9, 9)).save(folder / "wide.png")
            folders[case] = folder
        print(f"{'image folder':<28} {'peak RSS MiB':>12} {'x ordinary':>10} {'skipped':>8}")
        base = None
        for case, folder in folders.items():
            peak, skipped = _peak(folder, tmp / f"cache{len(case)}")
            base = base or peak
            print(f"{case:<28} {peak / 1024:>12.1f} {peak / base:>10.2f} {skipped:>8d}")


if __name__ == "__main__":
    main()
