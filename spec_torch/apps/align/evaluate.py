"""Evaluation of a student before and after alignment: zero-shot accuracy, image-text retrieval, kNN accuracy
and SPEC-diff to the teacher, each on a fixed evaluation set; and the before/after plot.

Every metric is a pure function of embeddings (``[n, d]`` tensors), so it can be tested on its own;
:func:`evaluate` embeds the evaluation sets with the student and calls them.

>>> import torch
>>> z = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
>>> knn_accuracy(z, ["a", "a", "b", "b"], k=1)
1.0
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ...api import spec
from ...errors import SpecError
from .._io import atomic_path
from ..data.base import SampleDataset
from ..logs import phase

log = logging.getLogger(__name__)

__all__ = [
    "EvalSet",
    "embed_images",
    "embed_texts",
    "knn_accuracy",
    "retrieval_recall",
    "zero_shot_accuracy",
    "teacher_clusters",
    "spec_diff_to_teacher",
    "evaluate",
    "plot_before_after",
    "metric_panels",
    "metric_direction",
    "metric_label",
    "metric_value",
]


@dataclass
class EvalSet:
    """Samples ``positions`` of ``dataset`` and what is known about them.

    Attributes:
        name: key of this set in the results (``"heldout"``, ``"imagenet"``).
        teacher: ``[m, dt]`` teacher features of the samples (row i = ``positions[i]``), or None.
        captions: per sample, its captions (image-text retrieval), or None.
        labels: per sample, a class label (kNN accuracy), or None.
        zero_shot: also score zero-shot classification over the label names (ImageNet class names).
    """

    name: str
    dataset: SampleDataset
    positions: np.ndarray
    teacher: torch.Tensor | None = None
    captions: list[list[str]] | None = None
    labels: list[str] | None = None
    zero_shot: bool = False


# --------------------------------------------------------------------------------------------- embedding
class _Images(torch.utils.data.Dataset):
    """``dataset[positions[k]]`` through ``transform`` (for a DataLoader with workers)."""

    def __init__(self, dataset: SampleDataset, positions: Sequence[int], transform: Callable[[Any], Any]):
        self.dataset, self.positions, self.transform = dataset, [int(i) for i in positions], transform

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, k: int) -> torch.Tensor:
        return self.transform(self.dataset[self.positions[k]])


@torch.no_grad()
def embed_images(
    model: torch.nn.Module,
    dataset: SampleDataset,
    positions: Sequence[int],
    transform: Callable[[Any], torch.Tensor],
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
) -> torch.Tensor:
    """``[m, d]`` float32 (CPU) image embeddings ``model.encode_image`` of ``dataset[positions]``, in eval mode."""
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(
        _Images(dataset, positions, transform),
        batch_size=batch_size,
        num_workers=num_workers,
        generator=torch.Generator(),  # leaves the global RNG alone (a resumed run replays it exactly)
    )
    out = []
    try:
        for imgs in loader:
            out.append(model.encode_image(imgs.to(device)).float().cpu())  # [b, 3, H, W] -> [b, d]
    finally:
        model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def embed_texts(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    texts: Sequence[str],
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``[m, d]`` float32 (CPU) text embeddings ``model.encode_text`` of ``texts``, in eval mode."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(texts), batch_size):
            tokens = tokenizer(list(texts[start : start + batch_size])).to(device)  # [b, L]
            out.append(model.encode_text(tokens).float().cpu())  # [b, d]
    finally:
        model.train(was_training)
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------- metrics
def knn_accuracy(z: torch.Tensor, labels: Sequence[Any], k: int = 10) -> float:
    """Leave-one-out k-nearest-neighbour accuracy under cosine similarity (majority vote; a tie goes to the
    class of the nearest neighbour among the tied classes).

    Args:
        z: ``[n, d]`` embeddings; labels: ``n`` labels.
    """
    n = z.shape[0]
    if len(labels) != n:
        raise SpecError(f"labels: expected {n} labels (one per row of z), got {len(labels)}")
    if n < 2:
        raise SpecError(f"z: expected at least 2 samples for kNN accuracy, got {n}")
    k = min(k, n - 1)
    _, codes = np.unique(np.asarray([str(v) for v in labels]), return_inverse=True)
    y = torch.from_numpy(codes)  # [n]
    zn = F.normalize(z.double(), dim=1)
    sim = zn @ zn.T  # [n, n]
    sim.fill_diagonal_(-math.inf)  # leave one out
    nn_idx = sim.topk(k, dim=1).indices  # [n, k], nearest first
    nn_y = y[nn_idx]  # [n, k] neighbours' classes
    counts = torch.zeros(n, int(y.max()) + 1, dtype=torch.int64).scatter_add_(1, nn_y, torch.ones_like(nn_y))
    tied = counts == counts.max(1, keepdim=True).values  # [n, C] the most voted classes
    first = tied.gather(1, nn_y).to(torch.int8).argmax(1)  # the nearest neighbour of a most voted class
    pred = nn_y.gather(1, first[:, None]).squeeze(1)  # [n]
    return float((pred == y).double().mean())


def retrieval_recall(
    images: torch.Tensor, texts: torch.Tensor, text_image: Sequence[int], ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Image-text retrieval recall at k under cosine similarity.

    Args:
        images: ``[n, d]`` image embeddings; texts: ``[m, d]`` text embeddings.
        text_image: ``[m]`` the image (row of ``images``) each text describes.

    Returns:
        ``{"i2t_R@k": ..., "t2i_R@k": ...}``: image->text counts a hit when any of the image's texts is in
        its top k; text->image when its image is.
    """
    owner = torch.as_tensor(list(text_image), dtype=torch.int64)  # [m]
    sim = F.normalize(images.double(), dim=1) @ F.normalize(texts.double(), dim=1).T  # [n, m]
    out: dict[str, float] = {}
    for k in ks:
        top_t = sim.topk(min(k, sim.shape[1]), dim=1).indices  # [n, k] texts per image
        hit_i = (owner[top_t] == torch.arange(sim.shape[0])[:, None]).any(1)
        top_i = sim.T.topk(min(k, sim.shape[0]), dim=1).indices  # [m, k] images per text
        hit_t = (top_i == owner[:, None]).any(1)
        out[f"i2t_R@{k}"] = float(hit_i.double().mean())
        out[f"t2i_R@{k}"] = float(hit_t.double().mean())
    return out


def zero_shot_classifier(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[Callable[[str], str]],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``[C, d]`` unit rows: each class's normalised text embeddings averaged over ``templates``
    (open_clip's ``build_zero_shot_classifier``, run in eval mode)."""
    from open_clip import build_zero_shot_classifier

    was_training = model.training
    model.eval()
    try:
        weights = build_zero_shot_classifier(
            model, tokenizer, list(classnames), list(templates), device=device
        )
    finally:
        model.train(was_training)
    return weights.T.float().cpu()  # [d, C] -> [C, d]


def zero_shot_accuracy(images: torch.Tensor, classifier: torch.Tensor, targets: Sequence[int]) -> dict:
    """Top-1 (and top-5 with at least 5 classes) accuracy of ``images [n, d]`` against ``classifier [C, d]``."""
    logits = F.normalize(images.float(), dim=1) @ classifier.T  # [n, C]
    y = torch.as_tensor(list(targets), dtype=torch.int64)
    out = {"zeroshot_top1": float((logits.argmax(1) == y).double().mean())}
    if classifier.shape[0] >= 5:
        out["zeroshot_top5"] = float((logits.topk(5, dim=1).indices == y[:, None]).any(1).double().mean())
    return out


def teacher_clusters(teacher: torch.Tensor, n_clusters: int, seed: int = 0) -> list[int]:
    """KMeans cluster of each row of the (unit-normalised) teacher features ``[m, dt]``."""
    from sklearn.cluster import KMeans

    k = max(2, min(int(n_clusters), teacher.shape[0] // 2))
    z = F.normalize(teacher.double(), dim=1).numpy()
    return KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(z).tolist()


def _templates(name: str) -> list[Callable[[str], str]]:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    table = {"openai": OPENAI_IMAGENET_TEMPLATES, "simple": SIMPLE_IMAGENET_TEMPLATES}
    if name not in table:
        raise SpecError(f"eval.templates: expected one of {sorted(table)}, got {name!r}")
    return list(table[name])


def spec_diff_to_teacher(
    model: torch.nn.Module,
    es: EvalSet,
    transform: Callable[[Any], torch.Tensor],
    kernel_student: Any = "cosine",
    kernel_teacher: Any = "cosine",
    eta: float = 1.0,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
) -> float:
    """SPEC-diff between the student's image embeddings of ``es`` and its teacher features (the logged curve)."""
    if es.teacher is None:
        raise SpecError(f"es: the {es.name} evaluation set has no teacher features")
    img = embed_images(model, es.dataset, es.positions, transform, batch_size, device, num_workers)
    if not torch.isfinite(img).all():
        raise SpecError(f"student: NaN/Inf image embeddings on the {es.name} evaluation set")
    return float(spec(img, es.teacher, kernel_x=kernel_student, kernel_y=kernel_teacher, eta=eta).spec_diff)


#: bootstrap replicates for the held-out eigenvalue of the strongest mode (spec_torch.uncertainty)
MODE_REPLICATES = 20


def strongest_mode_heldout(
    student: torch.Tensor,
    teacher: torch.Tensor,
    kernel_student: Any = "cosine",
    kernel_teacher: Any = "cosine",
    eta: float = 1.0,
    seed: int = 0,
) -> dict[str, float]:
    """Is the mode the loss pushes on (the strongest |lambda|, SPEC-diff's) real on this split?

    Its eigenvalue, held-out eigenvalue (fitted on half the split's samples, measured on the other half) and
    stability (docs/uncertainty.md), from ``student: [n, d]`` and ``teacher: [n, t]``; empty when a kernel has
    no feature map or the split is too small (fewer than 64 samples).
    """
    from ...kernels import resolve_kernel

    ks = resolve_kernel(kernel_student, "kernel_student")
    kt = resolve_kernel(kernel_teacher, "kernel_teacher")
    if not (ks.has_features and kt.has_features) or student.shape[0] < 64:
        return {}
    res = spec(student, teacher, ks, kt, eta=eta, top_k=1, replicates=MODE_REPLICATES, seed=seed)
    top = int(res.eigenvalues.abs().argmax())
    return {
        "mode_eigenvalue": float(res.eigenvalues[top]),
        "mode_heldout_eigenvalue": float(res.heldout_eigenvalues[top]),
        "mode_stability": float(res.stability[top]),
    }


# -------------------------------------------------------------------------------------------- the driver
def evaluate(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    transform: Callable[[Any], torch.Tensor],
    sets: Sequence[EvalSet],
    kernel_student: Any = "cosine",
    kernel_teacher: Any = "cosine",
    eta: float = 1.0,
    knn_k: int = 10,
    n_clusters: int = 10,
    templates: str = "openai",
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    seed: int = 0,
    num_workers: int = 0,
) -> dict[str, dict[str, float]]:
    """All metrics of the student ``model`` on every evaluation set: ``{set name: {metric: value}}``.

    Metrics per set (where the set has what they need): ``spec_diff`` to the teacher (and the eigenvalue sum
    of the strongest mode of each sign; ``mode_heldout_eigenvalue`` and ``mode_stability`` of the strongest
    mode, :func:`strongest_mode_heldout`), ``knn_teacher_clusters`` (kNN accuracy of the student on KMeans
    clusters of the teacher; ``knn_teacher_clusters_teacher`` is the teacher's own score, the ceiling),
    ``knn_labels``, ``i2t_R@1/5`` and ``t2i_R@1/5``, ``zeroshot_top1/5``.
    """
    results: dict[str, dict[str, float]] = {}
    for es in sets:
        with phase(log, f"evaluating the student on {es.name} ({len(es.positions)} samples)"):
            results[es.name] = _evaluate_set(
                model, tokenizer, transform, es, kernel_student, kernel_teacher, eta, knn_k, n_clusters,
                templates, batch_size, device, seed, num_workers,
            )  # fmt: skip
    return results


def _evaluate_set(
    model, tokenizer, transform, es, kernel_student, kernel_teacher, eta, knn_k, n_clusters, templates,
    batch_size, device, seed, num_workers,
) -> dict[str, float]:  # fmt: skip
    """The metrics of :func:`evaluate` on one evaluation set."""
    img = embed_images(model, es.dataset, es.positions, transform, batch_size, device, num_workers)
    if not torch.isfinite(img).all():
        raise SpecError(f"student: NaN/Inf image embeddings on the {es.name} evaluation set")
    out: dict[str, float] = {"n": float(img.shape[0])}
    if es.teacher is not None:
        res = spec(img, es.teacher, kernel_x=kernel_student, kernel_y=kernel_teacher, eta=eta)
        out["spec_diff"] = float(res.spec_diff)
        out["lambda_max"] = float(res.eigenvalues.max())
        out["lambda_min"] = float(res.eigenvalues.min())
        out.update(strongest_mode_heldout(img, es.teacher, kernel_student, kernel_teacher, eta, seed))
        clusters = teacher_clusters(es.teacher, n_clusters, seed)
        out["knn_teacher_clusters"] = knn_accuracy(img, clusters, knn_k)
        out["knn_teacher_clusters_teacher"] = knn_accuracy(es.teacher, clusters, knn_k)
    if es.labels is not None:
        out["knn_labels"] = knn_accuracy(img, es.labels, knn_k)
    if es.captions is not None:
        flat = [c for caps in es.captions for c in caps]
        owner = [i for i, caps in enumerate(es.captions) for _ in caps]
        txt = embed_texts(model, tokenizer, flat, batch_size, device)  # [sum captions, d]
        out.update(retrieval_recall(img, txt, owner))
    if es.zero_shot and es.labels is not None:
        classnames = sorted(set(es.labels))
        index = {c: j for j, c in enumerate(classnames)}
        clf = zero_shot_classifier(model, tokenizer, classnames, _templates(templates), device)
        out.update(zero_shot_accuracy(img, clf, [index[c] for c in es.labels]))
    return out


# ----------------------------------------------------------------------------------------------- the plot
#: metrics where lower is better: SPEC-diff, and the magnitude of the loss's strongest mode in sample and held out
#: (its signed value says which side holds the group; its size shrinks when training works)
LOWER_IS_BETTER = ("spec_diff", "mode_eigenvalue", "mode_heldout_eigenvalue")
#: signed metrics shown and compared as magnitudes (``|mode_eigenvalue|``)
MAGNITUDE = ("mode_eigenvalue", "mode_heldout_eigenvalue")
#: metrics with no better direction, shown apart: the stability of the strongest mode says whether the remaining
#: difference is one reproducible direction (high) or spread over near-tied directions (low, noise-like); read it
#: with the held-out |eigenvalue|
DIAGNOSTIC = ("mode_stability",)
#: the teacher's own score: the same before and after (a ceiling line, not a before/after pair)
TEACHER_CONSTANT = "knn_teacher_clusters_teacher"
#: what a panel's title says of its metrics
DIRECTION_TITLE = {"lower": "lower is better", "higher": "higher is better", "neither": "no better direction"}


def metric_direction(key: str) -> str:
    """``"lower"``, ``"higher"`` or ``"neither"``: which way a metric of :func:`evaluate` moves when the student
    is closer to the teacher (accuracies and recalls: higher)."""
    if key in LOWER_IS_BETTER:
        return "lower"
    return "neither" if key in DIAGNOSTIC else "higher"


def metric_label(key: str) -> str:
    """The name a metric is shown under: ``|mode_eigenvalue|`` for the :data:`MAGNITUDE` ones."""
    return f"|{key}|" if key in MAGNITUDE else key


def metric_value(key: str, value: float) -> float:
    """The value shown and compared: the magnitude for :data:`MAGNITUDE` metrics."""
    return abs(float(value)) if key in MAGNITUDE else float(value)


def metric_panels(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
) -> list[tuple[str, str, list[str]]]:
    """The before/after panels of :func:`plot_before_after`: ``[(set name, title, metric keys), ...]``, one per
    evaluation set and direction (titles from :data:`DIRECTION_TITLE`); ``lambda_*`` and the teacher's own
    score are left out."""
    groups = []
    for name in [s for s in after if s in before]:
        keys = [k for k in after[name] if k != "n" and k in before[name] and not k.startswith("lambda")]
        keys = [k for k in keys if k != TEACHER_CONSTANT]
        for direction in ("lower", "higher", "neither"):
            chosen = [k for k in keys if metric_direction(k) == direction]
            if chosen:
                groups.append((name, DIRECTION_TITLE[direction], chosen))
    return groups


def plot_before_after(
    before: dict[str, dict[str, float]],
    after: dict[str, dict[str, float]],
    path: str | Path,
    history: dict[str, list[float]] | None = None,
) -> Path:
    """Before/after bars per evaluation set, lower-is-better metrics (SPEC-diff, |eigenvalue| of the loss's
    strongest mode in sample and held out), higher-is-better ones (accuracies, recalls) and the stability
    (no better direction) on separate panels (:func:`metric_panels`), the teacher's own kNN score as a dashed
    ceiling; then the training curves (all lower is better), the SPEC term and the contrastive term on
    separate y axes.

    Args:
        history: ``{"step": [...], "loss_spec": [...], "loss_clip": [...], "heldout_step": [...],
            "heldout_spec_diff": [...]}`` from the training log.
    """
    from matplotlib.figure import Figure

    groups = metric_panels(before, after)  # (set name, title, keys)
    panels = max(len(groups) + (1 if history else 0), 1)
    cols = min(panels, 2)  # two panels a row: readable when the page shows the plot at its width
    rows = -(-panels // cols)
    fig = Figure(figsize=(5.6 * cols, 4.4 * rows), layout="constrained")
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax in axes[panels:]:
        ax.set_visible(False)
    axes = axes[:panels]
    for ax, (name, title, keys) in zip(axes, groups):
        x = np.arange(len(keys))
        ax.bar(
            x - 0.2, [metric_value(k, before[name][k]) for k in keys], 0.4, label="before", color="#9aa5b1"
        )
        ax.bar(x + 0.2, [metric_value(k, after[name][k]) for k in keys], 0.4, label="after", color="#2f6db5")
        if title == "higher is better" and TEACHER_CONSTANT in after[name] and "knn_teacher_clusters" in keys:
            j = keys.index("knn_teacher_clusters")
            ax.hlines(after[name][TEACHER_CONSTANT], j - 0.45, j + 0.45, colors="black", linestyles="dashed",
                      label="teacher's own")  # fmt: skip
        ax.set_xticks(x, [metric_label(k) for k in keys], rotation=35, ha="right", fontsize=9)
        ax.set_title(f"{name} (n={int(after[name]['n'])}): {title}", fontsize=10)
        ax.legend(fontsize=9)
    if history:
        ax = axes[-1]
        if history.get("loss_spec"):
            ax.plot(history["step"], history["loss_spec"], label="train SPEC term", color="#c0392b", lw=1)
        if history.get("heldout_spec_diff"):
            ax.plot(history["heldout_step"], history["heldout_spec_diff"], "o-", label="held-out SPEC-diff",
                    color="#2f6db5")  # fmt: skip
        ax.set_xlabel("step")
        ax.set_ylabel("SPEC")
        ax.set_title("training: lower is better", fontsize=10)
        handles, labels = ax.get_legend_handles_labels()
        if history.get("loss_clip") and any(v != 0 for v in history["loss_clip"]):
            twin = ax.twinx()  # the contrastive term has its own scale
            twin.plot(
                history["step"], history["loss_clip"], label="train contrastive term", color="#7f8c8d", lw=1
            )
            twin.set_ylabel("contrastive")
            h2, l2 = twin.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        ax.legend(handles, labels, fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format=Path(path).suffix.lstrip(".") or "png")
    return Path(path)
