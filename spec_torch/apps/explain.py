"""Modes named in words: the distinctive terms of each mode's texts against the rest of the dataset.

A mode's *members* are the samples on its positive side scoring at least half its best score (the report's
cluster-size rule, :data:`spec_torch.apps.report.html.SIZE_RULE`), each weighted by its squared score, scaled
so that the weights sum to the number of members (the group is worth as many texts as it has; a higher score
weighs more). Their weighted term counts are compared with those of the rest of the dataset (the other
samples) by the weighted log-odds ratio with an informative Dirichlet prior (Monroe, Colaresi & Quinn 2008,
"Fightin' words"), the prior taken from the whole corpus: ``alpha_w`` = the term's count over all texts,
``alpha_0`` = their total. For term w with member count ``a``, rest count ``b``, member total ``n_a`` and rest
total ``n_b``::

    delta_w = log((a + alpha_w) / (n_a + alpha_0 - a - alpha_w))
              - log((b + alpha_w) / (n_b + alpha_0 - b - alpha_w))
    z_w     = delta_w / sqrt(1 / (a + alpha_w) + 1 / (b + alpha_w))

The prior shrinks rare terms towards the corpus rate, so a term must be both over-represented among the members
and frequent enough to be evidence. The terms with ``z >= min_z`` (default 3) are reported, at most ``top_n``
(default 5), by z (rounded to 2 decimals) and then by term: deterministic. A mode with no such term has *no
distinctive words*: frequent terms are never printed in their place. The prior as large as the corpus makes z
conservative: random groups of 1%, 5%, 20% and 50% of 20,000 generated texts (``bench/bench_keywords.py``'s)
had a largest z over their 3,631 terms of 1.1-1.9, 1.4-1.9, 1.8-2.7 and 1.9-2.2 (5 draws each).

Terms are the 1- and 2-grams of scikit-learn's :class:`~sklearn.feature_extraction.text.CountVectorizer` with
English stop words, kept when in at least ``min_df`` texts and at most a fraction ``max_df`` of them (so a
template shared by every text, "a photo of a", drops out). Counts stay sparse: the cost is one pass of the vectorizer
over the texts and one sparse product per run (``bench/bench_keywords.py``).

The compare and matrix jobs call :func:`mode_keywords` in their explain stage and store each mode's
``keywords: [[term, z], ...]`` in spec.json / matrix.json; every view renders them with :func:`keywords_phrase`.

>>> import numpy as np
>>> texts = [f"a photo of a {w}" for w in ["fox"] * 10 + ["cat", "dog", "owl", "bee", "elk"] * 10]
>>> scores = np.r_[np.ones(10), np.zeros(50)][:, None]  # [n, 1]: the ten fox texts are the mode
>>> mode_keywords(scores, texts)  # "photo" is in every text: above max_df, not a term
[[('fox', 3.23), ('photo fox', 3.23)]]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import SpecError

__all__ = [
    "KEYWORD_DEFAULTS",
    "NO_WORDS",
    "keyword_settings",
    "mode_keywords",
    "term_counts",
    "keywords_from_counts",
    "member_weights",
    "oriented_scores",
    "set_scores",
    "keywords_phrase",
    "keywords_tag",
]

#: the config's ``explain.keywords`` defaults (and :func:`mode_keywords`'s)
KEYWORD_DEFAULTS: dict[str, Any] = {
    "top_n": 5,
    "min_z": 3.0,
    "ngram_range": (1, 2),
    "min_df": 2,
    "max_df": 0.5,
}
#: what a mode without a term at ``z >= min_z`` says
NO_WORDS = "no distinctive words"
#: a member scores at least this fraction of its mode's best score (the report's cluster-size rule)
MEMBER_FRACTION = 0.5


# ------------------------------------------------------------------------------------------- settings
def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def keyword_settings(
    settings: Mapping[str, Any] | None = None, name: str = "explain.keywords"
) -> dict[str, Any]:
    """``settings`` (the config's ``explain.keywords``, or keyword arguments) checked and completed with
    :data:`KEYWORD_DEFAULTS`; :class:`SpecError` naming ``name.<key>`` for a bad or unknown one."""
    if settings is None:
        settings = {}
    if not isinstance(settings, Mapping):
        raise SpecError(f"{name}: expected a mapping of {sorted(KEYWORD_DEFAULTS)}, got {settings!r}")
    unknown = sorted(set(settings) - set(KEYWORD_DEFAULTS))
    if unknown:
        raise SpecError(f"{name}: unknown setting(s) {unknown}; expected some of {sorted(KEYWORD_DEFAULTS)}")
    out = {**KEYWORD_DEFAULTS, **settings}
    top_n, min_z, ngrams, min_df, max_df = (
        out[k] for k in ("top_n", "min_z", "ngram_range", "min_df", "max_df")
    )
    if not _is_int(top_n) or top_n < 1:
        raise SpecError(f"{name}.top_n: expected a positive integer, got {top_n!r}")
    if not _is_number(min_z) or not math.isfinite(float(min_z)):
        raise SpecError(f"{name}.min_z: expected a finite number, got {min_z!r}")
    if (
        not isinstance(ngrams, Sequence)
        or isinstance(ngrams, str)
        or len(ngrams) != 2
        or not all(_is_int(v) for v in ngrams)
        or not 1 <= ngrams[0] <= ngrams[1]
    ):
        raise SpecError(f"{name}.ngram_range: expected [lo, hi] with 1 <= lo <= hi, got {ngrams!r}")
    for key, value in (("min_df", min_df), ("max_df", max_df)):
        ok = (_is_int(value) and value >= 1) or (
            _is_number(value) and not _is_int(value) and 0.0 < float(value) <= 1.0
        )
        if not ok:
            raise SpecError(
                f"{name}.{key}: expected a count of texts (an integer >= 1) or a fraction of them in (0, 1], "
                f"got {value!r}"
            )
    return {
        "top_n": int(top_n),
        "min_z": float(min_z),
        "ngram_range": [int(ngrams[0]), int(ngrams[1])],  # a list: as it reads back from spec.json
        "min_df": int(min_df) if _is_int(min_df) else float(min_df),
        "max_df": int(max_df) if _is_int(max_df) else float(max_df),
    }


# --------------------------------------------------------------------------------------------- counts
def _doc_count(value: int | float, n: int) -> float:
    """A ``min_df``/``max_df`` setting as a number of texts (scikit-learn's reading: a float is a fraction)."""
    return value if _is_int(value) else value * n


def term_counts(
    texts: Sequence[str], ngram_range=(1, 2), min_df: int | float = 2, max_df: int | float = 0.5
) -> tuple[Any, list[str]]:
    """Sparse term counts of ``texts``: ``(counts [n, V] scipy CSR, terms [V] sorted)``.

    scikit-learn's ``CountVectorizer`` (English stop words, ``ngram_range``), keeping the terms in at least
    ``min_df`` and at most ``max_df`` texts (an integer: a count; a float: a fraction). The lines of a text are
    analysed one by one (an image's captions, joined by newlines: no 2-gram spans two of them). No term left
    (few or empty texts, or ``max_df`` below ``min_df`` for this many texts): ``V = 0``.
    """
    import scipy.sparse as sp
    from sklearn.feature_extraction.text import CountVectorizer

    n = len(texts)
    empty = sp.csr_matrix((n, 0), dtype=np.int64), []
    if n == 0 or _doc_count(max_df, n) < _doc_count(min_df, n):
        return empty
    lines = CountVectorizer(stop_words="english", ngram_range=tuple(ngram_range)).build_analyzer()

    def analyzer(text: str) -> list[str]:  # each line on its own: no 2-gram spans two joined captions
        return [term for line in text.split("\n") for term in lines(line)] if "\n" in text else lines(text)

    vectorizer = CountVectorizer(analyzer=analyzer, min_df=min_df, max_df=max_df, dtype=np.int64)
    try:
        counts = vectorizer.fit_transform([str(t) for t in texts])  # [n, V] CSR, terms in sorted order
    except ValueError:  # "empty vocabulary" / "After pruning, no terms remain": nothing to name modes by
        return empty
    return counts.tocsr(), [str(t) for t in vectorizer.get_feature_names_out()]


def member_weights(scores: np.ndarray) -> Any:
    """Members of each mode, weighted: ``[M, n]`` sparse, ``k s_i^2 / sum s^2`` over the ``k`` members
    (``s_i >= best / 2``, ``best`` = the column's largest score, so on the positive side); the weights of a
    mode sum to its number of members. Empty rows for a mode whose scores are all <= 0."""
    import scipy.sparse as sp

    n, m = scores.shape
    rows, cols, vals = [], [], []
    for j in range(m):
        s = scores[:, j]
        best = float(s.max()) if n else 0.0
        if not best > 0:
            continue
        idx = np.flatnonzero(s >= MEMBER_FRACTION * best)  # [k] members, in sample order
        rows.append(np.full(idx.size, j))
        cols.append(idx)
        w = (s[idx] / best) ** 2  # [k] in [1/4, 1]
        vals.append(w * (idx.size / w.sum()))
    if not rows:
        return sp.csr_matrix((m, n))
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(m, n))


def keywords_from_counts(
    scores: np.ndarray, counts: Any, terms: Sequence[str], top_n: int = 5, min_z: float = 3.0
) -> list[list[tuple[str, float]]]:
    """The distinctive terms of each mode (the module's log-odds z), from ``scores [n, M]`` and sparse
    ``counts [n, V]`` with their ``terms [V]``: per mode ``[(term, z), ...]``, best first, ``z >= min_z``."""
    weights = member_weights(scores)  # [M, n] sparse
    m = scores.shape[1]
    if counts.shape[1] == 0:
        return [[] for _ in range(m)]
    total = np.asarray(counts.sum(axis=0), dtype=np.float64).ravel()  # [V] corpus counts = the prior alpha
    members = np.asarray((weights @ counts).todense(), dtype=np.float64)  # [M, n] @ [n, V] -> [M, V]
    inside = weights.copy()
    inside.data[:] = 1.0  # [M, n] membership
    rest = total[None, :] - np.asarray((inside @ counts).todense(), dtype=np.float64)  # [M, V] the others
    alpha, alpha0 = total, total.sum()
    n_a = members.sum(axis=1, keepdims=True)  # [M, 1]
    n_b = rest.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        delta = np.log((members + alpha) / (n_a + alpha0 - members - alpha)) - np.log(
            (rest + alpha) / (n_b + alpha0 - rest - alpha)
        )  # [M, V]
        z = delta / np.sqrt(1.0 / (members + alpha) + 1.0 / (rest + alpha))
    z = np.round(np.where(np.isfinite(z), z, -np.inf), 2)  # rounded: ties (then by term) survive float noise
    out = []
    for j in range(m):
        if weights[j].nnz == 0:
            out.append([])
            continue
        keep = np.flatnonzero(z[j] >= min_z)
        ranked = sorted(keep.tolist(), key=lambda v: (-z[j, v], terms[v]))[:top_n]
        out.append([(terms[v], float(z[j, v])) for v in ranked])
    return out


def mode_keywords(
    scores: Any,
    texts: Sequence[str],
    top_n: int = 5,
    min_z: float = 3.0,
    ngram_range: tuple[int, int] = (1, 2),
    min_df: int | float = 2,
    max_df: int | float = 0.5,
    *,
    x: Any = None,
    y: Any = None,
    modes: Sequence[int] | None = None,
) -> list[list[tuple[str, float]]]:
    """The distinctive words of each mode: per mode ``[(term, z), ...]``, best first; ``[]`` = no distinctive
    words (the module docstring gives the rule).

    Args:
        scores: the sample scores ``[n, M]`` (a tensor or array; column j is mode j, its positive side the
            group, as :meth:`SpecResult.sample_scores` orients it), or a :class:`~spec_torch.SpecResult`, then
            scored on ``x: [n, p]``, ``y: [n, q]`` (its compared samples) for ``modes`` (default: every mode
            with a nonzero eigenvalue).
        texts: ``[n]`` one text per sample, in the same order (a caption, a file name, a document).
        top_n, min_z, ngram_range, min_df, max_df: as ``explain.keywords`` in the configs
            (:data:`KEYWORD_DEFAULTS`).

    Example:
        >>> import spec_torch as st, torch
        >>> from spec_torch.apps.explain import mode_keywords
        >>> res = st.spec(x, y, kernel_x="cosine", kernel_y="cosine")  # doctest: +SKIP
        >>> mode_keywords(res, captions, x=x, y=y, modes=res.positive_modes(3))  # doctest: +SKIP
        [[('terrier', 9.4), ('spaniel', 7.1)], [], ...]
    """
    settings = keyword_settings(
        {"top_n": top_n, "min_z": min_z, "ngram_range": ngram_range, "min_df": min_df, "max_df": max_df},
        name="mode_keywords",
    )
    from ..result import SpecResult

    if isinstance(scores, SpecResult):
        if x is None or y is None:
            raise SpecError("x/y: a SpecResult is scored on its compared samples: pass x=[n, p] and y=[n, q]")
        scores = scores.sample_scores(x, y, modes=modes)
    elif x is not None or y is not None or modes is not None:
        raise SpecError("x/y/modes: only with a SpecResult as scores; sample scores [n, M] need none")
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().to("cpu", torch.float64).numpy()
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise SpecError(f"scores: expected sample scores [n, M] (or a SpecResult), got shape {scores.shape}")
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise SpecError(
            f"texts: expected a sequence of {scores.shape[0]} strings, got {type(texts).__name__}"
        )
    if len(texts) != scores.shape[0]:
        raise SpecError(f"texts: expected one text per row of scores ({scores.shape[0]}), got {len(texts)}")
    if not np.isfinite(scores).all():
        bad = int(np.argwhere(~np.isfinite(scores))[0][1])
        raise SpecError(f"scores: expected finite values, got NaN or inf in column {bad} (a zero mode?)")
    counts, terms = term_counts(texts, settings["ngram_range"], settings["min_df"], settings["max_df"])
    return keywords_from_counts(scores, counts, terms, settings["top_n"], settings["min_z"])


# -------------------------------------------------------------------------------- scores of a pipeline
@torch.no_grad()
def oriented_scores(res: Any, batches: Any, modes: Sequence[int], anchors: tuple[Any, Any]) -> np.ndarray:
    """Every sample's score on ``modes``, streamed: ``[n, M]`` float64, oriented as the top-samples pass
    (the mode's top sample scores positive).

    ``batches``: ``(x_b [B, p], y_b [B, q])`` in sample order; ``anchors``: ``(x_a [M, p], y_a [M, q])``, the
    top sample of each mode. :meth:`SpecResult.sample_scores` fixes each column's sign by the peak of the rows
    it is given; scoring the anchors with every batch lets each batch's columns be turned back to the mode's
    orientation (anchor j's score on mode j is positive), whatever batch holds the peak.
    """
    xa, ya = anchors
    m = len(modes)
    diag = torch.arange(m)
    parts = []
    for xb, yb in batches:
        xb, yb = torch.as_tensor(xb), torch.as_tensor(yb)
        s = res.sample_scores(torch.cat([xa.to(xb), xb]), torch.cat([ya.to(yb), yb]), modes=list(modes))
        sign = torch.where(s[diag, diag] < 0, -1.0, 1.0).to(s.dtype)  # [M]
        parts.append((s[m:] * sign).to("cpu", torch.float64).numpy())  # [B, M]
    return np.concatenate(parts) if parts else np.zeros((0, m))


def set_scores(scores: Any, sets: Sequence[Sequence[int]]) -> np.ndarray:
    """Each set of tied modes as one score column: ``[n, S]``, sample i's best relative score over the set's
    columns of ``scores [n, M]`` (oriented as the top samples), ``max_t max(s_it, 0) / max_j s_jt``.

    A tied set's modes are not identifiable one by one, but together they hold the groups their span holds.
    :func:`mode_keywords` on these columns takes as members the samples that are members of any of the set's
    modes (score at least half that mode's best), each weighted by its relative score squared, and names the
    set once. A rotation-free measure (the projection norm on the span) does not work here: with centred
    kernels every sample has a sizeable projection (the non-members sit on the negative side of each mode), so
    the norm hardly separates the groups (the demo's colour set: 0.070-0.085 over all 600 samples).
    """
    scores = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, np.float64)
    m = scores.shape[1] if scores.ndim == 2 else 0
    for t in sets:
        if not len(t) or not all(_is_int(j) and 0 <= j < m for j in t):
            raise SpecError(f"sets: expected non-empty lists of column indices in [0, {m}), got {list(t)!r}")
    if not sets:
        return np.zeros((len(scores), 0))
    best = scores.max(axis=0)  # [M]
    rel = np.where(best > 0, np.clip(scores, 0, None) / np.where(best > 0, best, 1.0), 0.0)  # [n, M]
    return np.stack([rel[:, list(t)].max(axis=1) for t in sets], 1)


# ---------------------------------------------------------------------------------------------- views
def keywords_phrase(entry: Mapping[str, Any] | None, with_z: bool = False) -> str | None:
    """A mode's ``keywords`` (a spec.json / matrix.json mode entry) in words: ``"terrier, spaniel"`` (with
    ``with_z``: ``"terrier (z 9.4), spaniel (z 7.1)"``), :data:`NO_WORDS` when empty, None when the entry has
    no ``keywords`` (the data has no texts)."""
    words = (entry or {}).get("keywords")
    if words is None:
        return None
    if not words:
        return NO_WORDS
    return ", ".join(f"{t} (z {float(z):.1f})" if with_z else str(t) for t, z in words)


def keywords_tag(entry: Mapping[str, Any] | None) -> str:
    """The suffix of one mode's CLI summary line: ``"  words: terrier, spaniel"``, ``"  no distinctive
    words"`` or ``""`` (no texts)."""
    phrase = keywords_phrase(entry)
    if phrase is None:
        return ""
    return f"  {phrase}" if phrase == NO_WORDS else f"  words: {phrase}"
