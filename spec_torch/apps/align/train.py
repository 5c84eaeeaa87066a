"""The alignment training loop: CLIP contrastive loss + SpecAlignLoss toward cached teacher features.

One step, for a batch of B samples (ids ``b``):

    img = student.encode_image(images_b)                 # [B, d]   trainable image tower
    txt = student.encode_text(tokens_b)                  # [B', d]  frozen or trainable text tower
    t   = teacher.lookup(b)                              # [B, dt]  cached teacher rows of the SAME ids
    loss = w_clip * contrastive(img, txt) + w_spec * SpecAlignLoss(img, t)

AdamW (no weight decay on gains and biases), linear warmup then cosine decay, gradient clipping, autocast on
CUDA (bf16 where supported, else fp16 with a GradScaler). A non-finite loss raises before the optimizer steps.

Checkpoints (``checkpoints/last.pt``, written atomically every ``ckpt_every`` steps and at the end) hold
everything a resumed run needs to continue exactly as an uninterrupted one: student weights, optimizer,
scheduler, grad scaler, the loss's buffers, the data position (epoch, batch) and the RNG states. Logs:
``logs/train.csv`` and TensorBoard (``logs/tb``), both trimmed back to the checkpoint's step on resume.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import pickle
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ...errors import SpecError
from ...loss import SpecAlignLoss
from .. import sharding as distributed
from .._io import atomic_open, atomic_torch_save, open_nofollow
from ..interrupt import interrupt_note
from .data import AlignSamples, ResumableBatchSampler, TeacherFeatures, collate_align
from .runtime import Runtime

__all__ = ["TrainSettings", "AlignTrainer", "StudentForward", "prompt_contrastive_loss", "warmup_cosine"]

log = logging.getLogger(__name__)

CONTRASTIVE = ("pairs", "prompts", "off")
CSV_FIELDS = (
    "step",
    "epoch",
    "lr",
    "loss",
    "loss_clip",
    "loss_spec",
    "grad_norm",
    "heldout_spec_diff",
    "time",
)


@dataclass
class TrainSettings:
    """Settings of the training loop (the ``train``, ``optim`` and ``loss`` weights of ``configs/align.yaml``).

    ``contrastive``: ``"pairs"`` (open_clip's ClipLoss on (image, caption) pairs, MS-COCO), ``"prompts"``
    (class prompts: each image against the distinct prompts of its batch) or ``"off"``.
    """

    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-5
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    amp: bool = True
    w_clip: float = 1.0
    w_spec: float = 1.0
    contrastive: str = "pairs"
    train_text: bool = False
    ckpt_every: int = 200
    log_every: int = 10
    heldout_every: int = 200
    num_workers: int = 0
    seed: int = 0
    progress: bool = True

    def check(self) -> None:
        for key in ("steps", "batch_size", "ckpt_every", "log_every", "heldout_every"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpecError(f"train.{key}: expected a positive integer, got {value!r}")
        for key in ("lr", "w_clip", "w_spec", "weight_decay", "warmup_steps", "min_lr_ratio"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise SpecError(f"{key}: expected a number >= 0, got {value!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise SpecError(f"optim.grad_clip: expected a positive number or null, got {self.grad_clip!r}")
        if self.contrastive not in CONTRASTIVE:
            raise SpecError(f"loss.contrastive: expected one of {CONTRASTIVE}, got {self.contrastive!r}")
        if self.w_clip == 0 and self.w_spec == 0:
            raise SpecError("loss.w_clip/w_spec: both are 0, nothing to train")
        from ..._validate import check_seed

        check_seed(self.seed, "seed")


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Learning-rate factor: linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``.

    Kept instead of timm's ``CosineLRScheduler``: as a pure function of the step behind torch's ``LambdaLR``,
    the schedule is restored exactly by the scheduler's own ``state_dict`` in checkpoints (the step count),
    with no second scheduler API to step (timm's needs ``step_update(num_updates)`` beside ``optimizer.step``
    and has its own state); the function is five lines and tested value by value.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def prompt_contrastive_loss(
    img: torch.Tensor, txt: torch.Tensor, owner: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """CLIP loss when images share texts (class prompts): each image against the batch's distinct prompts.

    Args:
        img: ``[B, d]`` unit image embeddings; txt: ``[U, d]`` unit embeddings of the distinct prompts;
        owner: ``[B]`` the prompt of each image (index into ``txt``).

    Returns:
        ``(CE(image -> its prompt) + CE(prompt -> its images, uniform over them)) / 2``; with all prompts
        distinct this is exactly open_clip's ClipLoss.
    """
    logits = logit_scale * img @ txt.T  # [B, d] @ [d, U] -> [B, U]
    i2t = F.cross_entropy(logits, owner)
    target = F.one_hot(owner, txt.shape[0]).T.to(logits.dtype)  # [U, B]
    t2i = F.cross_entropy(logits.T, target / target.sum(1, keepdim=True))
    return (i2t + t2i) / 2


class StudentForward(nn.Module):
    """The differentiable part of a training step as one module (what DDP wraps): images/tokens -> embeddings."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, images: torch.Tensor, tokens: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        img = self.clip.encode_image(images)  # [B, 3, H, W] -> [B, d]
        txt = self.clip.encode_text(tokens) if tokens is not None else None  # [U, L] -> [U, d]
        return img, txt


class AlignTrainer:
    """Fine-tunes an open_clip model's image tower (and optionally its text tower) toward a teacher.

    Args:
        model: the open_clip ``CLIP`` model (trained in place).
        tokenizer: its tokenizer (``list[str] -> [n, L]``).
        spec_loss: the :class:`SpecAlignLoss` (its buffers are checkpointed).
        samples: the training samples (:class:`AlignSamples`).
        teacher: cached teacher features, looked up by the batch's sample ids.
        settings: :class:`TrainSettings`.
        out_dir: run folder (``checkpoints/``, ``logs/``).
        runtime: device and rank (:class:`Runtime`).
        heldout_fn: ``model -> SPEC-diff on the held-out split``, logged every ``heldout_every`` steps.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        spec_loss: SpecAlignLoss,
        samples: AlignSamples,
        teacher: TeacherFeatures,
        settings: TrainSettings,
        out_dir: str | Path,
        runtime: Runtime | None = None,
        heldout_fn: Callable[[nn.Module], float] | None = None,
    ):
        settings.check()
        self.s, self.rt = settings, runtime or Runtime.detect("cpu")
        self.model, self.tokenizer = model.to(self.rt.device), tokenizer
        # the loss's buffers (warm start, fitted kernels) live on the training device too
        self.spec_loss = spec_loss.to(self.rt.device)
        self.samples, self.teacher, self.heldout_fn = samples, teacher, heldout_fn
        self.out_dir = Path(out_dir)
        self.ckpt_path = self.out_dir / "checkpoints" / "last.pt"
        #: the pipeline's settings that give the run its meaning (models, data, loss, optimiser); saved in
        #: checkpoints and compared on resume
        self.run_settings: dict[str, Any] = {}
        self.use_text = settings.contrastive != "off" and settings.w_clip > 0
        self._set_trainable()
        self.forward_module: nn.Module = StudentForward(model)  # DDP wraps this one
        self.forward_module = distributed.wrap_ddp(self.forward_module, self.rt.device)  # torchrun only
        self.sampler = ResumableBatchSampler(
            len(samples), settings.batch_size, settings.seed, True, self.rt.rank, self.rt.world_size
        )
        self.optimizer = self._make_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: warmup_cosine(step, settings.warmup_steps, settings.steps, settings.min_lr_ratio),
        )
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        if settings.contrastive == "pairs":
            from open_clip.loss import ClipLoss

            # DDP: every rank's features gathered with their gradient (each rank's rows get world_size times
            # their gradient, which DDP's averaging undoes, as for SpecAlignLoss); local_loss: only this
            # rank's rows of the logits, [B, world_size * B]
            self.clip_loss = ClipLoss(
                local_loss=True, gather_with_grad=True, rank=self.rt.rank, world_size=self.rt.world_size
            )
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.saved_step = 0  # the step of the checkpoint on disk (what train.resume=auto continues from)
        self._text_cache: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------ setup helpers
    def _set_trainable(self) -> None:
        """Image tower trainable; text tower trainable only with ``train_text``; logit scale frozen."""
        for name, p in self.model.named_parameters():
            p.requires_grad_(name.startswith("visual.") or (self.s.train_text and self.use_text))
        for name in ("logit_scale", "logit_bias"):
            p = getattr(self.model, name, None)
            if isinstance(p, nn.Parameter):
                p.requires_grad_(False)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def _make_optimizer(self) -> torch.optim.Optimizer:
        params = self.trainable_parameters()
        decay = [p for n, p in params if p.ndim >= 2 and "embedding" not in n]
        no_decay = [p for n, p in params if not (p.ndim >= 2 and "embedding" not in n)]
        groups = [
            {"params": decay, "weight_decay": self.s.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=self.s.lr, betas=tuple(self.s.betas), eps=self.s.eps)

    def _amp_dtype(self) -> torch.dtype | None:
        if not self.s.amp or self.rt.device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def _loader(self) -> DataLoader:
        return DataLoader(
            self.samples,
            batch_sampler=self.sampler,
            collate_fn=collate_align,
            num_workers=self.s.num_workers,
            pin_memory=self.rt.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.s.seed),  # worker seeds off the global RNG
        )

    # ------------------------------------------------------------------------------------------ one step
    def _texts(self, texts: list[str]) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Tokens of the texts to encode this step and ``owner [B]`` (each image's row among them).

        ``pairs``: every image's own caption. ``prompts``: the distinct prompts of the batch. With a frozen
        text tower, already-seen prompts come from a cache and are not re-encoded (tokens may be None).
        """
        if self.s.contrastive == "pairs":
            uniq, owner = texts, list(range(len(texts)))
        else:
            if self.rt.distributed:  # DDP: the prompts of the global batch, in rank order, on every rank
                texts = [t for part in distributed.all_gather_object(list(texts)) for t in part]
            uniq = sorted(set(texts))
            index = {t: j for j, t in enumerate(uniq)}
            owner = [index[t] for t in texts]
        owner_t = torch.tensor(owner, dtype=torch.int64, device=self.rt.device)
        self._uniq = uniq
        if self.s.train_text:
            return self.tokenizer(uniq).to(self.rt.device), owner_t
        if self.s.contrastive == "pairs":  # frozen tower, free captions: encode without a graph, no cache
            self._text_cache = {}
        todo = [t for t in dict.fromkeys(uniq) if t not in self._text_cache]
        if todo:
            with torch.no_grad(), self._autocast():
                z = self.model.encode_text(self.tokenizer(todo).to(self.rt.device)).float()  # [n, d]
            self._text_cache.update(zip(todo, z))
        return None, owner_t

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.rt.device.type, dtype=self.amp_dtype)

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        """One optimizer step on ``batch`` (from :func:`collate_align`); returns the logged values."""
        dev = self.rt.device
        images = batch["images"].to(dev, non_blocking=True)  # [B, 3, H, W]
        teacher = self.teacher.lookup(batch["ids"]).to(dev, non_blocking=True)  # [B, dt] the same samples
        tokens, owner = self._texts(batch["texts"]) if self.use_text else (None, None)
        self.model.train()
        if not (self.s.train_text and self.use_text):
            self._text_eval()
        with self._autocast():
            img, txt = self.forward_module(images, tokens)  # [B, d], [U, d] or None
        loss_spec = (
            self.spec_loss(img, teacher) if self.s.w_spec > 0 else img.new_zeros((), dtype=torch.float32)
        )
        loss_clip = img.new_zeros((), dtype=torch.float32)
        if self.use_text:
            if txt is None:  # frozen text tower: cached embeddings
                txt = torch.stack([self._text_cache[t] for t in self._uniq])
            scale = self.model.logit_scale.exp().float()
            img_n, txt_n = F.normalize(img.float(), dim=1), F.normalize(txt.float(), dim=1)
            if self.s.contrastive == "pairs":
                loss_clip = self.clip_loss(img_n, txt_n, scale)  # this rank's rows (local_loss)
            else:  # DDP: every rank's images against the global batch's prompts (owner is global)
                loss_clip = prompt_contrastive_loss(
                    distributed.all_gather_with_grad(img_n), txt_n, owner, scale
                )
        loss = self.s.w_clip * loss_clip + self.s.w_spec * loss_spec.float()
        if not torch.isfinite(loss):
            raise SpecError(
                f"loss: non-finite at step {self.step + 1} (clip {float(loss_clip):.4g}, spec "
                f"{float(loss_spec):.4g}); the optimizer did not step. Lower optim.lr or disable train.amp"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        params = [p for _, p in self.trainable_parameters()]
        max_norm = self.s.grad_clip if self.s.grad_clip is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        if self.rt.distributed and self.s.contrastive == "pairs":  # the logs show the global-batch value
            loss_clip = distributed.all_reduce_mean(loss_clip)
            loss = self.s.w_clip * loss_clip + self.s.w_spec * loss_spec.detach().float()
        return {
            "loss": float(loss.detach()),
            "loss_clip": float(loss_clip.detach()),
            "loss_spec": float(loss_spec.detach()),
            "grad_norm": float(grad_norm),
            "lr": lr,
        }

    def _text_eval(self) -> None:
        """Keep the frozen text tower in eval mode (it has no dropout today, but stay safe)."""
        for name, module in self.model.named_children():
            if name != "visual":
                module.eval()

    # ------------------------------------------------------------------------------------------ the loop
    def fit(self, on_step: Callable[[AlignTrainer], None] | None = None) -> AlignTrainer:
        """Train until ``settings.steps`` (continuing from ``self.step`` after :meth:`resume`).

        Args:
            on_step: called after every step (after logging and checkpointing), e.g. to stop early.
        """
        # Ctrl-C: the checkpoint on disk is where a rerun with train.resume=auto continues
        with interrupt_note(lambda: f"interrupted; `train.resume=auto` resumes from step {self.saved_step}"):
            return self._fit(on_step)

    def _fit(self, on_step: Callable[[AlignTrainer], None] | None) -> AlignTrainer:
        logger = _Logs(self.out_dir / "logs", self.step, enabled=self.rt.is_main)
        bar = tqdm(
            total=self.s.steps,
            initial=self.step,
            unit="step",
            desc="align",
            disable=not (self.s.progress and self.rt.is_main),
            dynamic_ncols=True,
        )
        t0 = time.monotonic()
        try:
            while self.step < self.s.steps:
                self.sampler.set_position(self.epoch, self.batch_in_epoch)
                for batch in self._loader():
                    values = self.train_step(batch)
                    self.step += 1
                    self.batch_in_epoch += 1
                    bar.set_postfix(  # no redraw here: update() draws once per step, with the new values
                        spec=f"{values['loss_spec']:.4f}", clip=f"{values['loss_clip']:.3f}", refresh=False
                    )
                    bar.update(1)
                    row = {"step": self.step, "epoch": self.epoch, "time": time.monotonic() - t0, **values}
                    last = self.step == self.s.steps
                    if self.heldout_fn is not None and (self.step % self.s.heldout_every == 0 or last):
                        if self.rt.is_main:
                            row["heldout_spec_diff"] = float(self.heldout_fn(self.model))
                        self.rt.barrier()
                    if self.step % self.s.log_every == 0 or last or "heldout_spec_diff" in row:
                        logger.write(row)
                    if self.step % self.s.ckpt_every == 0 or last:
                        logger.flush()
                        self.save_checkpoint()
                    if on_step is not None:
                        on_step(self)
                    if last:
                        break
                else:
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        finally:
            bar.close()
            logger.close()
        return self

    # ----------------------------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: weights, optimizer, scheduler, scaler, loss, data, RNG."""
        return {
            "step": self.step,
            "data": {"epoch": self.epoch, "batch": self.batch_in_epoch},
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "spec_loss": self.spec_loss.state_dict(),
            "rng": _rng_state(),
            "settings": {k: _plain_setting(v) for k, v in asdict(self.s).items()},
            "run_settings": json.dumps(self.run_settings, sort_keys=True, default=str),
            "world_size": self.rt.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, checked first (:meth:`check_state`)."""
        self.check_state(state)
        self._assign(state)

    def _assign(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.spec_loss.load_state_dict(state["spec_loss"])
        self.step = int(state["step"])
        self.epoch, self.batch_in_epoch = int(state["data"]["epoch"]), int(state["data"]["batch"])
        self.saved_step = self.step
        _set_rng_state(state["rng"])

    def check_state(self, state: dict[str, Any], path: str | Path = "the checkpoint") -> None:
        """Check every field of a loaded checkpoint against this trainer (after ``weights_only`` loading the
        contents are still untrusted): types, ranges, and shapes against the model, optimizer and loss. A
        :class:`SpecError` naming ``train.resume`` and the field otherwise; nothing is assigned here."""

        def bad(field: str, what: str) -> SpecError:
            return SpecError(
                f"train.resume: the checkpoint {path} is damaged or not this run's: {field} {what}; "
                "start a new output_dir, or give train.resume=<another checkpoint>"
            )

        missing = [
            k for k in ("step", "data", "model", "optimizer", "scheduler", "scaler", "rng") if k not in state
        ]
        if missing:
            raise bad(f"entries {missing}", "are missing")
        step = state["step"]
        if not _is_int(step) or not 0 <= step <= self.s.steps:
            raise bad("'step'", f"is {step!r}, expected an integer in 0..train.steps = {self.s.steps}")
        data = state["data"]
        if not isinstance(data, dict) or not all(_is_int(data.get(k)) for k in ("epoch", "batch")):
            raise bad("'data'", f"is {data!r}, expected {{'epoch': int, 'batch': int}}")
        per_epoch = self.sampler.batches_per_epoch
        if not 0 <= data["epoch"] <= step or not 0 <= data["batch"] <= per_epoch:
            raise bad("'data'", f"is {data!r}, expected epoch in 0..{step} and batch in 0..{per_epoch}")
        _check_tensors(state["model"], self.model.state_dict(), "'model'", bad)
        self._check_optimizer(state["optimizer"], bad)
        sched = state["scheduler"]
        if not isinstance(sched, dict) or sched.get("last_epoch") != step:
            got = sched.get("last_epoch") if isinstance(sched, dict) else type(sched).__name__
            raise bad("'scheduler'", f"has last_epoch {got!r}, expected the step {step}")
        base_lrs = sched.get("base_lrs")
        groups = len(self.optimizer.param_groups)
        if (
            not isinstance(base_lrs, list)
            or len(base_lrs) != groups
            or not all(_is_number(v) for v in base_lrs)
        ):
            raise bad("'scheduler'", f"has base_lrs {base_lrs!r}, expected {groups} numbers")
        scaler = state["scaler"]
        if not isinstance(scaler, dict) or not all(_is_number(v) for v in scaler.values()):
            raise bad("'scaler'", "must map names to numbers")
        self._check_spec_loss(state.get("spec_loss", {}), bad)
        _check_rng(state["rng"], bad)

    def _check_optimizer(self, opt: Any, bad: Callable[[str, str], SpecError]) -> None:
        mine = self.optimizer.state_dict()
        if not isinstance(opt, dict) or not isinstance(opt.get("param_groups"), list):
            raise bad("'optimizer'", "has no param_groups")
        if not isinstance(opt.get("state"), dict):
            raise bad("'optimizer'", "has no state")
        if len(opt["param_groups"]) != len(mine["param_groups"]):
            raise bad(
                "'optimizer'",
                f"has {len(opt['param_groups'])} parameter groups, this run {len(mine['param_groups'])}",
            )
        shapes: dict[int, torch.Size] = {}
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for k, (theirs, ours) in enumerate(zip(opt["param_groups"], mine["param_groups"])):
            ids = theirs.get("params") if isinstance(theirs, dict) else None
            if not isinstance(ids, list) or ids != ours["params"]:
                raise bad(f"'optimizer' group {k}", "lists other parameters than this run's model")
            for key in ("lr", "weight_decay", "eps"):
                if not _is_number(theirs.get(key)):
                    raise bad(f"'optimizer' group {k}", f"has {key}={theirs.get(key)!r}, expected a number")
        for pid, p in zip((i for g in mine["param_groups"] for i in g["params"]), params):
            shapes[pid] = p.shape
        for pid, entry in opt["state"].items():
            if pid not in shapes or not isinstance(entry, dict):
                raise bad("'optimizer' state", f"has an entry {pid!r} for no parameter of this run")
            for key, t in entry.items():
                if not isinstance(t, torch.Tensor) or not bool(torch.isfinite(t).all()):
                    raise bad(f"'optimizer' state {pid}.{key}", "must be a finite tensor")
                if key != "step" and t.shape != shapes[pid]:
                    raise bad(
                        f"'optimizer' state {pid}.{key}",
                        f"has shape {list(t.shape)}, the parameter {list(shapes[pid])}",
                    )
            if not {"step", "exp_avg", "exp_avg_sq"} <= set(entry):
                raise bad(
                    f"'optimizer' state {pid}",
                    f"lacks {sorted({'step', 'exp_avg', 'exp_avg_sq'} - set(entry))}",
                )

    def _check_spec_loss(self, saved: Any, bad: Callable[[str, str], SpecError]) -> None:
        """The loss's buffers: this loss's names, tensors of the same dtype; a trial load into a copy."""
        import copy

        mine = self.spec_loss.state_dict()
        if not isinstance(saved, dict) or set(saved) != set(mine):
            got = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
            raise bad("'spec_loss'", f"holds {got}, this run's loss {sorted(mine)}")
        for key, t in saved.items():
            if not isinstance(t, torch.Tensor) or t.dtype != mine[key].dtype:
                raise bad(f"'spec_loss.{key}'", f"must be a {mine[key].dtype} tensor")
        trial = copy.deepcopy(self.spec_loss)
        try:
            trial.load_state_dict(saved)
        except (RuntimeError, ValueError, SpecError) as exc:
            raise bad("'spec_loss'", f"does not load ({' '.join(str(exc).split())[:200]})") from None

    def save_checkpoint(self) -> None:
        """Write ``checkpoints/last.pt`` atomically (rank 0 only; every rank waits for it)."""
        if self.rt.is_main:
            atomic_torch_save(self.state_dict(), self.ckpt_path, resume=True)  # kept by a rerun
        self.rt.barrier()
        self.saved_step = self.step

    def resume(self, path: str | Path | None = None, force: bool = False) -> bool:
        """Load ``path`` (default ``checkpoints/last.pt``) if it exists; True when a checkpoint was loaded.

        The checkpoint is read with ``torch.load(weights_only=True)`` (a file that needs arbitrary pickled
        objects is refused: loading it could run code). Settings that change what the run means (the
        ``run_settings`` given by the pipeline: models, data, loss, optimiser; and the loop settings below)
        must equal the checkpoint's, unless ``force`` (``train.resume_force=true``). What is resumed is
        logged (path, step).
        """
        path = Path(path) if path is not None else self.ckpt_path
        if not path.is_file():
            if path != self.ckpt_path:
                raise SpecError(f"train.resume: no such checkpoint: {path}")
            return False
        try:
            state = torch.load(path, map_location=self.rt.device, weights_only=True)
        except pickle.UnpicklingError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SpecError(
                f"train.resume: refused the checkpoint {path}: it holds objects that are not plain tensors and "
                f"settings (loading it could run code: {first[:200]})"
            ) from None
        except Exception as exc:
            raise SpecError(f"train.resume: cannot read the checkpoint {path}: {exc}") from None
        if not isinstance(state, dict) or not {"step", "model", "settings", "rng"} <= set(state):
            raise SpecError(f"train.resume: {path} is not an alignment checkpoint (checkpoints/last.pt)")
        if not isinstance(state["settings"], dict):
            raise SpecError(f"train.resume: the checkpoint {path} is damaged: 'settings' must be a dict")
        saved = dict(state.get("settings", {}))
        for key in ("steps", "batch_size", "seed", "contrastive", "train_text"):
            mine = getattr(self.s, key)
            if key in saved and saved[key] != _plain_setting(mine):
                raise SpecError(
                    f"train.resume: the checkpoint {path} was written with {key}={saved[key]!r}, this run has "
                    f"{key}={mine!r}; an exact resume needs the same settings (or start a new output_dir)"
                )
        changed = _changed(_json_or_empty(state.get("run_settings")), self.run_settings)
        changed += [
            f"{k}: {saved[k]!r} -> {_plain_setting(getattr(self.s, k))!r}"
            for k in _MEANING_KEYS
            if k in saved and saved[k] != _plain_setting(getattr(self.s, k))
        ]
        if changed and not force:
            raise SpecError(
                f"train.resume: the checkpoint {path} was trained with other settings that change the run's "
                f"meaning ({'; '.join(changed[:6])}); use a new output_dir, or train.resume_force=true to "
                "continue anyway"
            )
        world = state.get("world_size", 1)
        if isinstance(world, bool) or not isinstance(world, int) or world < 1:
            raise SpecError(f"train.resume: the checkpoint {path} is damaged: 'world_size' is {world!r}")
        if world != self.rt.world_size:  # DDP: the data shards depend on it
            raise SpecError(
                f"train.resume: the checkpoint {path} was written by {state.get('world_size', 1)} process(es), "
                f"this run has {self.rt.world_size}; an exact resume needs the same number (--nproc_per_node)"
            )
        self.check_state(state, path)  # every field, before anything is assigned
        if self.rt.is_main and path == self.ckpt_path:  # resume=auto continues this folder's log
            _kept_log_rows(self.out_dir / "logs" / "train.csv", int(state["step"]))
        self._assign(state)
        if self.rt.is_main:
            note = " (the run is already finished: 0 steps to train)" if self.step >= self.s.steps else ""
            forced = f"; FORCED over changed settings: {'; '.join(changed)}" if changed else ""
            log.warning("RESUMING from %s at step %d of %d%s%s", path, self.step, self.s.steps, note, forced)
        return True


_MEANING_KEYS = (
    "lr",
    "weight_decay",
    "betas",
    "eps",
    "warmup_steps",
    "min_lr_ratio",
    "grad_clip",
    "w_clip",
    "w_spec",
)


def _plain_setting(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _json_or_empty(text: Any) -> dict[str, Any]:
    try:
        value = json.loads(text) if isinstance(text, str) else {}
    except ValueError:
        value = {}
    return value if isinstance(value, dict) else {}


def _changed(saved: dict[str, Any], mine: dict[str, Any] | None) -> list[str]:
    """``"key: old -> new"`` for each top-level setting that differs (none when either side is unknown)."""
    if not saved or not mine:
        return []
    return [
        f"{k}: {saved.get(k)!r} -> {mine.get(k)!r}"
        for k in sorted(set(saved) | set(mine))
        if saved.get(k) != mine.get(k)
    ]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_tensors(saved: Any, mine: dict[str, torch.Tensor], field: str, bad) -> None:
    """``saved``: exactly ``mine``'s names, each a tensor of the same shape and dtype (floating ones finite)."""
    if not isinstance(saved, dict):
        raise bad(field, f"is a {type(saved).__name__}, expected a state dict")
    missing, extra = sorted(set(mine) - set(saved)), sorted(set(saved) - set(mine))
    if missing or extra:
        raise bad(field, f"does not match this run's model (missing {missing[:3]}, unexpected {extra[:3]})")
    for key, ref in mine.items():
        t = saved[key]
        if not isinstance(t, torch.Tensor) or t.shape != ref.shape or t.dtype != ref.dtype:
            got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise bad(f"{field} {key!r}", f"is {got}, this run's model has {ref.dtype} {list(ref.shape)}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise bad(f"{field} {key!r}", "holds NaN or Inf")


def _check_rng(rng: Any, bad) -> None:
    """The RNG states as :func:`_rng_state` writes them, with the sizes and ranges each generator takes."""
    if not isinstance(rng, dict):
        raise bad("'rng'", "must be a dict")
    mine = torch.get_rng_state()
    t = rng.get("torch")
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.shape != mine.shape:
        raise bad("'rng.torch'", f"must be a uint8 tensor of shape {list(mine.shape)}")
    cuda = rng.get("cuda", [])
    if not isinstance(cuda, list) or not all(
        isinstance(c, torch.Tensor) and c.dtype == torch.uint8 for c in cuda
    ):
        raise bad("'rng.cuda'", "must be a list of uint8 tensors")
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count() or any(
            c.shape != s.shape for c, s in zip(cuda, torch.cuda.get_rng_state_all())
        ):
            raise bad("'rng.cuda'", "does not match this machine's CUDA generators")
    npy = rng.get("numpy")
    if not isinstance(npy, dict) or npy.get("kind") != "MT19937":
        raise bad("'rng.numpy'", "must be a MT19937 state")
    keys = npy.get("keys")
    if not isinstance(keys, torch.Tensor) or keys.shape != (624,) or keys.is_floating_point():
        raise bad("'rng.numpy.keys'", "must be 624 integers")
    if bool((keys < 0).any()) or bool((keys >= 2**32).any()):
        raise bad("'rng.numpy.keys'", "must lie in 0..2**32-1")
    if not (_is_int(npy.get("pos")) and 0 <= npy["pos"] <= 624) or npy.get("has_gauss") not in (0, 1):
        raise bad("'rng.numpy'", "has pos outside 0..624 or has_gauss not 0/1")
    if not isinstance(npy.get("cached_gaussian"), float):
        raise bad("'rng.numpy.cached_gaussian'", "must be a float")
    py = rng.get("python")
    if not isinstance(py, dict) or py.get("version") != 3:
        raise bad("'rng.python'", "must be a version-3 state")
    st = py.get("state")
    if not isinstance(st, torch.Tensor) or st.shape != (625,) or st.is_floating_point():
        raise bad("'rng.python.state'", "must be 625 integers")
    if bool((st < 0).any()) or bool((st[:624] >= 2**32).any()) or not 0 <= int(st[624]) <= 624:
        raise bad("'rng.python.state'", "must hold 624 words in 0..2**32-1 and a position in 0..624")
    if py.get("gauss") is not None and not isinstance(py.get("gauss"), float):
        raise bad("'rng.python.gauss'", "must be a float or None")


# ------------------------------------------------------------------------------------------------- RNG
def _rng_state() -> dict[str, Any]:
    """The RNG states as tensors and plain values (a checkpoint must load with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, mt, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    npy = state["numpy"]
    keys = npy["keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))


# ------------------------------------------------------------------------------------------------ logs
class _Logs:
    """``train.csv`` and TensorBoard scalars (main rank only); rows after ``resume_step`` are dropped."""

    def __init__(self, folder: Path, resume_step: int, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        folder.mkdir(parents=True, exist_ok=True)
        self.csv_path = folder / "train.csv"
        kept = _kept_log_rows(self.csv_path, resume_step) if resume_step > 0 else []
        # rewritten: a resumed run drops the rows it will redo
        with atomic_open(self.csv_path, "w", newline="", record=False) as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(kept)
        self.fh = open_nofollow(self.csv_path, "a", newline="")
        self.csv = csv.DictWriter(self.fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(folder / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.csv.writerow({k: row.get(k, "") for k in CSV_FIELDS})
        step = int(row["step"])
        for key in ("loss", "loss_clip", "loss_spec", "lr", "grad_norm"):
            self.tb.add_scalar(f"train/{key}", row[key], step)
        if "heldout_spec_diff" in row:
            self.tb.add_scalar("heldout/spec_diff", row["heldout_spec_diff"], step)

    def flush(self) -> None:
        if self.enabled:
            self.fh.flush()
            self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.fh.close()
            self.tb.close()


def _kept_log_rows(csv_path: Path, resume_step: int) -> list[dict[str, str]]:
    """The rows of ``train.csv`` up to ``resume_step`` (a resumed run redoes the later ones). A log that is not
    one this trainer wrote (other columns, a step or value that is not a number, binary bytes) is refused in
    one line naming ``train.resume``."""
    if not csv_path.is_file():
        return []

    def bad(what: str) -> SpecError:
        return SpecError(
            f"train.resume: the training log {csv_path} is damaged ({what}); delete or repair it to resume "
            "(the checkpoint is intact), or start a new output_dir"
        )

    kept = []
    try:
        with open(csv_path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is not None and list(reader.fieldnames) != list(CSV_FIELDS):
                raise bad(f"columns {list(reader.fieldnames)[:10]}, expected {list(CSV_FIELDS)}")
            for line, row in enumerate(reader, start=2):
                if None in row or any(v is None for v in row.values()):
                    raise bad(f"line {line} has {len(row)} fields, expected {len(CSV_FIELDS)}")
                try:
                    step = int(row["step"])
                    for key in CSV_FIELDS[1:]:
                        if row[key] != "":
                            float(row[key])
                except ValueError:
                    raise bad(f"line {line} is not numbers: {str(row)[:120]}") from None
                if step <= resume_step:
                    kept.append(row)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise bad(str(exc)[:120]) from None
    return kept


def read_history(csv_path: str | Path) -> dict[str, list[float]]:
    """The training log as columns (for the plot): step, loss terms, held-out SPEC-diff at its steps."""
    hist: dict[str, list[float]] = {"step": [], "loss_spec": [], "loss_clip": [], "heldout_step": []}
    hist["heldout_spec_diff"] = []
    path = Path(csv_path)
    if not path.is_file():
        return hist
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            hist["step"].append(int(r["step"]))
            hist["loss_spec"].append(float(r["loss_spec"]))
            hist["loss_clip"].append(float(r["loss_clip"]))
            if r.get("heldout_spec_diff"):
                hist["heldout_step"].append(int(r["step"]))
                hist["heldout_spec_diff"].append(float(r["heldout_spec_diff"]))
    return hist
