"""Compare two encoders on one dataset with SPEC; writes spec.json, plots and report.html to the run dir.

The work is :func:`spec_torch.apps.compare.run`; this file is ``spec-torch compare`` (:mod:`spec_torch.apps.cli`) run from a clone;
the configs are the packaged ones (``spec_torch/apps/configs/compare/``).

Examples::

    # the offline demo: synthetic images with planted attributes, two offline encoders (= make demo)
    python scripts/compare.py experiment=demo

    # CLIP ViT-B/32 vs DINOv2 ViT-B/14 on ImageNet val
    python scripts/compare.py experiment=imagenet_clip_vs_dinov2 data.root=/data/imagenet/val

    # two text encoders on MS-COCO captions
    python scripts/compare.py experiment=mscoco_captions_text_encoders \\
        data.annotations=/data/coco/annotations/captions_val2017.json

    # precomputed embeddings (the machine-readable contract: OUT/spec.json)
    python scripts/compare.py data=features data.x_path=A.npy data.y_path=B.npy \\
        kernel@kernel_x=cosine kernel@kernel_y=cosine hydra.run.dir=OUT

    # any image folder, any pair of encoders and kernels
    python scripts/compare.py data=imagefolder data.root=/my/images \\
        encoder@encoder_x=open_clip_vit_b32 encoder@encoder_y=torchvision_resnet50 \\
        kernel@kernel_x=gaussian kernel_x.sigma=auto top_k=5

    # several processes (GPUs) on one node: each extracts its block of the data; rank 0 writes the run dir
    torchrun --nproc_per_node=8 scripts/compare.py experiment=imagenet_clip_vs_dinov2 data.root=/data/imagenet/train

Bad input (missing paths, unknown models, mismatched feature files, an unwritable output directory) prints
one line ``error: ...`` to stderr and exits with status 2; no spec.json is written.
"""

from __future__ import annotations

import sys

from spec_torch.apps.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
