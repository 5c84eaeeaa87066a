"""Fine-tune an open_clip student's image tower so that it captures the clusters a frozen teacher captures.

Loss = w_clip * CLIP contrastive loss + w_spec * SpecAlignLoss (SPEC-diff between the student's and the
teacher's kernel matrices on the batch; teacher features precomputed once, cached, looked up by sample id).
The work is :func:`spec_torch.apps.align.pipeline.run`; this file is ``spec-torch align`` (:mod:`spec_torch.apps.cli`) run from a clone;
the configs are the packaged ones (``spec_torch/apps/configs/align/``).

Examples::

    # the offline demo: tiny random student, weight-free colour teacher, synthetic shapes (150 steps)
    python scripts/align.py experiment=align_tiny

    # CLIP ViT-B/32 toward DINOv2 ViT-B/14 on MS-COCO (captions keep the text tower usable)
    python scripts/align.py experiment=align_mscoco_clip_to_dinov2 \\
        data.root=/data/coco/train2017 data.annotations=/data/coco/annotations/captions_train2017.json \\
        eval.imagenet_root=/data/imagenet/val

    # the same on ImageNet with class-name prompts (loss.w_clip=0: SPEC term only)
    python scripts/align.py experiment=align_imagenet_clip_to_dinov2 \\
        data.root=/data/imagenet/train eval.imagenet_root=/data/imagenet/val

    # continue an interrupted run: the same command with its run folder
    python scripts/align.py experiment=align_tiny hydra.run.dir=outputs/align_tiny train.resume=auto

    # several GPUs: DDP, train.batch_size per process (global batch = nproc x batch_size); rank 0 writes
    torchrun --nproc_per_node=8 scripts/align.py experiment=align_mscoco_clip_to_dinov2 train.batch_size=32 \
        data.root=/data/coco/train2017 data.annotations=/data/coco/annotations/captions_train2017.json

Bad input (missing paths, unknown models, pretrained weights that are not available offline) prints one
line ``error: ...`` to stderr and exits with status 2.
"""

from __future__ import annotations

import sys

from spec_torch.apps.cli import main

if __name__ == "__main__":
    sys.exit(main(["align", *sys.argv[1:]]))
