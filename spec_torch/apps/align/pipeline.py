"""The alignment pipeline behind ``spec-torch align``: ``run(cfg)`` with the composed ``configs/align/align.yaml``.

1. check the settings and the output folder; build the training dataset and its texts;
2. the teacher (frozen): features of every training sample extracted once into the feature cache, then
   looked up by sample id (samples the teacher could not read are left out);
3. the student: an open_clip model (pretrained weights fail fast when absent), image tower trainable, text
   tower frozen or trainable (``train.train_text``);
4. a deterministic train / held-out split (``heldout``), and the evaluation sets: the held-out split
   (SPEC-diff to the teacher, kNN accuracy on the teacher's clusters and on labels, retrieval for MS-COCO)
   and optionally an ImageNet-layout folder (zero-shot and kNN accuracy);
5. evaluation before training (``eval_before.json``, kept across resumes), training with checkpoints and
   logs (:class:`AlignTrainer`), evaluation after;
6. ``student.pt`` (the fine-tuned open_clip state dict, loadable with ``encoder.checkpoint=``), the plot,
   ``report.html`` (:func:`~spec_torch.apps.report.align_html.write_align_report`) and ``results.json``
   written atomically, last: a folder with ``results.json`` is a finished run.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ...errors import SpecError
from ...loss import SpecAlignLoss
from .._io import atomic_torch_save, atomic_write_json, prepare_output_dir
from ..cli import check_required
from ..config import for_setting, instantiate_target, load_config
from ..logs import quiet_third_party
from .data import AlignSamples, TeacherFeatures, class_labels, sample_texts, split_rows
from .evaluate import EvalSet, evaluate, plot_before_after, spec_diff_to_teacher
from .runtime import Runtime
from .train import AlignTrainer, TrainSettings, read_history

__all__ = ["run", "build_student", "RESULTS_JSON"]

log = logging.getLogger(__name__)

RESULTS_JSON = "results.json"
BEFORE_JSON = "eval_before.json"
_SPEC_KEYS = ("kernel_student", "kernel_teacher", "eta", "batch_size", "device", "num_workers")


# -------------------------------------------------------------------------------------------- settings
def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _contrastive(cfg: DictConfig, data_name: str) -> str:
    mode = cfg.loss.contrastive
    if float(cfg.loss.w_clip) == 0:
        return "off"
    if mode == "auto":
        return "pairs" if data_name == "mscoco" else "prompts"
    return str(mode)


def settings_from(cfg: DictConfig, data_name: str) -> TrainSettings:
    """:class:`TrainSettings` from the ``train``, ``optim`` and ``loss`` sections."""
    t, o, lo = cfg.train, cfg.optim, cfg.loss
    return TrainSettings(
        steps=t.steps,
        batch_size=t.batch_size,
        lr=float(o.lr),
        weight_decay=float(o.weight_decay),
        betas=tuple(float(b) for b in o.betas),
        eps=float(o.eps),
        warmup_steps=int(o.warmup_steps),
        min_lr_ratio=float(o.min_lr_ratio),
        grad_clip=None if o.grad_clip is None else float(o.grad_clip),
        amp=bool(t.amp),
        w_clip=float(lo.w_clip),
        w_spec=float(lo.w_spec),
        contrastive=_contrastive(cfg, data_name),
        train_text=bool(t.train_text),
        ckpt_every=t.ckpt_every,
        log_every=t.log_every,
        heldout_every=t.heldout_every,
        num_workers=t.num_workers,
        seed=int(cfg.seed),
        progress=bool(cfg.progress),
    )


# ---------------------------------------------------------------------------------------------- models
def _encoder(enc_cfg: dict[str, Any], which: str):
    from ..encoders import build_encoder

    if "_target_" in enc_cfg:  # a user's own Encoder class, named by Hydra's _target_
        return instantiate_target(enc_cfg, which)
    kwargs = dict(enc_cfg)
    family = kwargs.pop("family", None)
    try:
        return build_encoder(family, **kwargs)
    except SpecError as exc:  # encoder.checkpoint= -> teacher.checkpoint=: printed overrides that work
        raise SpecError(f"{which}: {for_setting(str(exc), which)}") from None


def build_student(student_cfg: dict[str, Any]) -> tuple[torch.nn.Module, Any, Any]:
    """``(clip model, image transform, tokenizer)`` of the open_clip student config (weights fail fast)."""
    import open_clip

    if student_cfg.get("family") != "open_clip":
        raise SpecError(f"student.family: expected open_clip, got {student_cfg.get('family')!r}")
    enc = _encoder({**student_cfg, "tower": "image"}, "student")
    model = enc.model
    tokenizer = open_clip.get_tokenizer(enc.model_name, context_length=getattr(model, "context_length", None))
    return model, enc.transform, tokenizer


def _teacher_cache(cfg: DictConfig, dataset, device: torch.device):
    from ..sharding import extract_sharded

    teacher = _encoder(_plain(cfg.teacher), "teacher")
    if teacher.modality != "image":
        raise SpecError(f"teacher: expected an image encoder, got a {teacher.modality} encoder")
    cache = extract_sharded(  # extract_features; under torchrun each rank embeds its block of the data
        dataset,
        teacher,
        cfg.cache_dir,
        batch_size=int(cfg.eval.batch_size),
        num_workers=int(cfg.train.num_workers),
        device=device,
        progress=bool(cfg.progress),
        amp=bool(cfg.train.amp),
        lock_timeout=float(cfg.get("cache_lock_timeout", 86400)),
    )
    return cache, teacher.describe()


def _kernel(node: Any) -> Any:
    return instantiate_target(_plain(node), "kernel")


def build_spec_loss(cfg: DictConfig) -> SpecAlignLoss:
    lo = cfg.loss
    return SpecAlignLoss(
        _kernel(cfg.kernel_student),
        _kernel(cfg.kernel_teacher),
        eta=float(lo.eta),
        norm=lo.norm,
        k=int(lo.k),
        one_sided=bool(lo.one_sided),
        solver=lo.solver,
    )


# ------------------------------------------------------------------------------------------ evaluation
def _eval_sets(
    cfg: DictConfig, dataset, texts, heldout: np.ndarray, teacher: TeacherFeatures
) -> list[EvalSet]:
    ids = [dataset.sample_id(int(i)) for i in heldout]
    labels = class_labels(dataset, cfg.eval.get("label_attribute"))
    sets = [
        EvalSet(
            "heldout",
            dataset,
            heldout,
            teacher=teacher.lookup(ids),
            captions=[texts.options(int(i)) for i in heldout]
            if texts is not None and texts.kind == "captions" and cfg.eval.retrieval
            else None,
            labels=[labels[int(i)] for i in heldout] if labels is not None else None,
        )
    ]
    root = cfg.eval.get("imagenet_root")
    if root:
        from ..data import build_dataset

        inet = build_dataset(
            "imagenet", root=root, max_per_class=cfg.eval.get("imagenet_max_per_class"), max_samples=None
        )
        sets.append(EvalSet("imagenet", inet, np.arange(len(inet)), labels=inet.labels, zero_shot=True))
    return sets


def _check(cfg: DictConfig) -> None:
    check_required(cfg)
    eta = cfg.loss.eta
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta > 0 or not math.isfinite(eta):
        raise SpecError(f"loss.eta: expected a positive number, got {eta!r}")


# ---------------------------------------------------------------------------------------------- driver
def run(
    cfg: DictConfig | dict | list[str] | None = None, on_step: Callable[[AlignTrainer], None] | None = None
) -> dict[str, Any]:
    """Fine-tune the student toward the teacher as configured; returns the contents of ``results.json``.

    Args:
        cfg: the composed ``configs/align/align.yaml`` (from ``spec-torch align``), or what to change in the
            packaged defaults: Hydra overrides (``["experiment=align_tiny", "train.steps=20"]``), a dict, a
            partial DictConfig or None (:func:`spec_torch.apps.config.load_config`).
        on_step: called after every training step with the trainer (tests interrupt a run with it).
    """
    from ..data import build_dataset

    cfg = load_config("align", cfg)
    quiet_third_party(bool(cfg.get("verbose", False)))
    _check(cfg)
    rt = Runtime.detect(cfg.device)
    out = prepare_output_dir(cfg)
    if rt.is_main:
        (out / RESULTS_JSON).unlink(missing_ok=True)  # a rerun is unfinished until it writes it again
    torch.manual_seed(int(cfg.seed))

    data_cfg = dict(_plain(cfg.data))
    data_name = data_cfg.pop("name")
    if data_name not in ("mscoco", "imagenet", "imagefolder", "synthetic"):
        raise SpecError(
            f"data.name: alignment trains on images; expected mscoco, imagenet, imagefolder or synthetic, got {data_name!r}"
        )
    if data_name == "mscoco" and data_cfg.get("modality", "image") != "image":
        raise SpecError("data.modality: the alignment dataset must be the images (modality=image)")
    dataset = build_dataset(data_name, **data_cfg)
    settings = settings_from(cfg, data_name)
    settings.check()
    texts = sample_texts(dataset) if settings.contrastive != "off" or cfg.eval.retrieval else None
    if texts is not None and settings.contrastive == "pairs" and texts.kind != "captions":
        raise SpecError(
            f"loss.contrastive: 'pairs' needs captions (mscoco), the {data_name} data has class prompts"
        )

    model, transform, tokenizer = build_student(_plain(cfg.student))  # fails fast on missing weights
    cache, teacher_info = _teacher_cache(cfg, dataset, rt.device)
    teacher = TeacherFeatures(cache)
    usable = np.array([i for i in range(len(dataset)) if dataset.sample_id(i) in teacher], dtype=np.int64)
    train_rows, heldout_rows = split_rows(len(usable), cfg.heldout, int(cfg.seed))
    train_pos, heldout_pos = usable[train_rows], usable[heldout_rows]
    samples = AlignSamples(
        dataset, train_pos, transform, texts if settings.contrastive != "off" else None, int(cfg.seed)
    )
    sets = _eval_sets(cfg, dataset, texts, heldout_pos, teacher)

    eval_kwargs = dict(
        kernel_student=_kernel(cfg.kernel_student),
        kernel_teacher=_kernel(cfg.kernel_teacher),
        eta=float(cfg.loss.eta),
        knn_k=int(cfg.eval.knn_k),
        n_clusters=int(cfg.eval.teacher_clusters),
        templates=cfg.eval.templates,
        batch_size=int(cfg.eval.batch_size),
        device=rt.device,
        seed=int(cfg.seed),
        num_workers=int(cfg.train.num_workers),
    )
    spec_loss = build_spec_loss(cfg)
    trainer = AlignTrainer(
        model,
        tokenizer,
        spec_loss,
        samples,
        teacher,
        settings,
        out,
        runtime=rt,
        heldout_fn=lambda m: spec_diff_to_teacher(
            m, sets[0], transform, **{k: eval_kwargs[k] for k in _SPEC_KEYS}
        ),
    )
    trainer.run_settings = run_settings(cfg)
    checkpoint = _checkpoint_to_resume(cfg.train.resume, trainer.ckpt_path)
    before = _saved_before(out / BEFORE_JSON, trainer.run_settings) if checkpoint is not None else None
    fresh_before = before is None
    if fresh_before:  # the model is still the untrained student here, also when a checkpoint is loaded next
        before = evaluate(model, tokenizer, transform, sets, **eval_kwargs)
    force = bool(cfg.train.get("resume_force", False))
    resumed = trainer.resume(checkpoint, force=force) if checkpoint is not None else False
    if fresh_before and rt.is_main:  # after a refused resume the old run's evaluation stays
        atomic_write_json(out / BEFORE_JSON, {"metrics": before, "run_settings": trainer.run_settings})
    if rt.is_main:
        _print_table("before", before)

    trainer.fit(on_step=on_step)

    after = evaluate(model, tokenizer, transform, sets, **eval_kwargs)
    results = {
        "before": before,
        "after": after,
        "steps": trainer.step,
        "resumed": resumed,
        "n_train": len(train_pos),
        "n_heldout": len(heldout_pos),
        "contrastive": settings.contrastive,
        "teacher": teacher_info,
        "teacher_cache": str(cache.path),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if rt.is_main:
        atomic_torch_save(model.state_dict(), out / "student.pt")
        history = read_history(out / "logs" / "train.csv")
        if "spec_diff" in before["heldout"]:  # the curve starts at the untrained student
            history["heldout_step"].insert(0, 0)
            history["heldout_spec_diff"].insert(0, before["heldout"]["spec_diff"])
        plot = plot_before_after(before, after, out / "plots" / "align_metrics.png", history)
        from ..report.align_html import write_align_report

        results["report"] = write_align_report(out, results, plot).name
        atomic_write_json(out / RESULTS_JSON, results)  # last: its presence marks a finished run
        _print_table("after", after)
        _print_change(before, after, out)
    rt.barrier()
    return results


def run_settings(cfg: DictConfig) -> dict[str, Any]:
    """The config sections that give a training run its meaning (compared on resume): models, data, loss,
    optimiser, kernels, held-out split and seed."""
    keys = (
        "student",
        "teacher",
        "data",
        "loss",
        "optim",
        "kernel_student",
        "kernel_teacher",
        "heldout",
        "seed",
    )
    plain = OmegaConf.to_container(cfg, resolve=True)
    return json.loads(json.dumps({k: plain.get(k) for k in keys}, sort_keys=True, default=str))


def _saved_before(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The untrained student's metrics saved by the run being resumed, or None (absent, broken, other run)."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or "metrics" not in saved:
        return None
    if "run_settings" in saved and saved["run_settings"] != settings:
        return None
    return saved["metrics"]


def _checkpoint_to_resume(resume: Any, default: Path) -> Path | None:
    """The checkpoint ``train.resume`` asks to continue from (auto: ``default`` if present), or None."""
    if resume in (None, False, "none"):
        if default.is_file():
            raise SpecError(
                f"train.resume: {default} exists but resume is off; use train.resume=auto to continue it, "
                "or another output_dir"
            )
        return None
    if resume == "auto":
        return default if default.is_file() else None
    path = Path(str(resume)).expanduser()
    if not path.is_file():
        raise SpecError(f"train.resume: no such checkpoint: {path}")
    return path


def _print_table(title: str, metrics: dict[str, dict[str, float]]) -> None:
    for name, values in metrics.items():
        shown = ", ".join(f"{k}={v:.4f}" for k, v in values.items() if k != "n")
        log.info(f"[{title}] {name} (n={int(values['n'])}): {shown}")


def _print_change(before: dict, after: dict, out: Path) -> None:
    if "spec_diff" in before.get("heldout", {}):
        b, a = before["heldout"]["spec_diff"], after["heldout"]["spec_diff"]
        log.info(f"held-out SPEC-diff to the teacher: {b:.4f} -> {a:.4f} ({b / max(a, 1e-12):.2f}x lower)")
        if "mode_heldout_eigenvalue" in after["heldout"]:  # is the loss's mode real out of sample?
            h = after["heldout"]
            log.info(
                f"strongest mode after training: eigenvalue {h['mode_eigenvalue']:+.4f}, held-out "
                f"{h['mode_heldout_eigenvalue']:+.4f}, stability {h['mode_stability']:.2f} (docs/uncertainty.md)"
            )
    log.info(f"results: {out / RESULTS_JSON}, report: {out / 'report.html'}")
