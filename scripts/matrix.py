"""The SPEC matrix of many encoders (and their layers) on one dataset; writes matrix.json and report.html.

The work is :func:`spec_torch.apps.matrix.run`; this file only parses the Hydra config (``spec_torch/apps/configs/matrix/matrix.yaml``; ``spec-torch matrix`` is the same command).

Examples::

    # offline demo: two weight-free encoders and the four stages of a small random CNN (< 2 min on a CPU)
    python scripts/matrix.py experiment=matrix_demo

    # several open_clip and timm models on ImageNet val
    python scripts/matrix.py experiment=matrix_imagenet_models data.root=/data/imagenet/val

    # layer by layer: CLIP ViT-B/32 blocks vs DINOv2 ViT-B/14 blocks
    python scripts/matrix.py experiment=layers_clip_vs_dinov2 data.root=/data/imagenet/val

    # any encoders, any layers
    python scripts/matrix.py data=imagefolder data.root=/my/images \\
        +encoders.cnn='{family: timm, model: resnet50.a1_in1k, pretrained: true, layers: all}'

    # several processes (GPUs) on one node: each extracts and streams its block of the data; rank 0 writes
    torchrun --nproc_per_node=8 scripts/matrix.py experiment=matrix_imagenet_models data.root=/data/imagenet/val

Bad input prints one line ``error: ...`` to stderr and exits with status 2; no matrix.json is written.
"""

from __future__ import annotations

import sys

from spec_torch.apps.cli import main

if __name__ == "__main__":
    sys.exit(main(["matrix", *sys.argv[1:]]))
