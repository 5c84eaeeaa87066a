"""Plain-words warnings about what a reported number means, shared by the CLI summary and ``report.html``:
the closed table of mode flag codes :data:`FLAGS` and the rule :func:`mode_flag_codes`, the one source every
view renders a mode's flags from.

- A *uniform* mode: its eigenvector is close to the constant vector ``1/sqrt(n)`` (``uniformity`` =
  ``|<v_k, 1>| / sqrt(n)`` near 1, in each spec.json mode entry). It scores every sample alike, so it is not a
  cluster: its eigenvalue measures how much the two kernels' *average* similarity (their levels) differ, e.g.
  cosine vs Gaussian. Centring both kernels (``center=true``) removes it.
- Random-feature error: the ``approximation`` estimate of :func:`spec_torch.rff_error_estimate`.
- The permutation reference: SPEC-diff as a fraction of its value with the pairing shuffled
  (``spec_diff_ratio``, ``spec_diff_null``; docs/uncertainty.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...result import UNIFORM_THRESHOLD

__all__ = [
    "UNIFORM_THRESHOLD",
    "uniform_modes",
    "UNIFORM_MEANING",
    "approximation_line",
    "reference_phrase",
    "reference_line",
    "REFERENCE_MEANING",
    "FLAGS",
    "SUPPORTED_MEANING",
    "mode_flag_codes",
    "entry_flags",
    "flag_label",
    "flag_labels",
]

# a mode whose ``uniformity`` exceeds UNIFORM_THRESHOLD (the library's, spec_torch.result) is flagged as
# uniform (kernel levels, not a cluster). For a random unit vector uniformity is about ``1/sqrt(n)``; a real
# cluster of a fraction f of the samples has at most about ``sqrt(f)``, so 0.9 flags only modes that are
# essentially constant over the samples.

UNIFORM_MEANING = (
    "A uniform mode scores every sample about alike, so it is not a cluster: its eigenvalue measures a "
    "difference in the two kernels' average similarity (their kernel levels, e.g. cosine vs Gaussian), not a "
    "group of samples one embedding holds together. To compare clusters only, rerun with center=true "
    "(both kernels centred), which removes it."
)


def _uniformity(entry: Mapping[str, Any]) -> float | None:
    value = entry.get("uniformity")
    return None if value is None else float(value)


def uniform_modes(
    modes: Mapping[str, Any] | None, threshold: float = UNIFORM_THRESHOLD
) -> list[tuple[str, int, float, float]]:
    """The flagged modes of a spec.json ``modes`` dict: ``[(direction, rank, eigenvalue, uniformity), ...]``.

    Entries without ``uniformity`` are never flagged.
    """
    out = []
    for direction in ("x", "y"):
        for entry in (modes or {}).get(direction) or []:
            u = _uniformity(entry)
            if u is not None and u > threshold:
                out.append((direction, int(entry.get("rank", 0)), float(entry["eigenvalue"]), u))
    return out


def approximation_line(approx: Mapping[str, Any] | None) -> str:
    """One line on the random-feature error estimate of spec.json ``approximation``, or ``""``."""
    if not approx or approx.get("rel_error_mean") is None:
        return ""
    bias = float(approx["rel_bias_mean"])
    return (
        f"random features: extreme eigenvalues off by about {float(approx['rel_error_mean']):.1%} "
        f"(magnitude {'inflated' if bias >= 0 else 'deflated'} by {abs(bias):.1%} on average, seed spread "
        f"{float(approx['seed_spread']):.1%}; exact vs random features on {approx['subsample']} rows)"
    )


REFERENCE_MEANING = (
    "0% means the same kernel geometry (e.g. a rotated copy); about 100% means as different as two "
    "embeddings paired at random (with centred kernels it cannot exceed 100%). It is a scale for SPEC-diff, "
    "not a test: whether SPEC-diff is above sampling noise is what its interval says."
)


def reference_phrase(spec: Mapping[str, Any]) -> str:
    """``"38% of the value for unrelated embeddings ..."`` from spec.json ``spec_diff_ratio`` and
    ``spec_diff_null``, or ``""`` when the reference is absent."""
    ratio, null = spec.get("spec_diff_ratio"), spec.get("spec_diff_null")
    if ratio is None or null is None:
        return ""
    return (
        f"{float(ratio):.0%} of the value for unrelated embeddings with the same marginals "
        f"(pairing shuffled: {float(null):.4g})"
    )


def reference_line(spec: Mapping[str, Any]) -> str:
    """SPEC-diff against its permutation reference in plain words, or ``""`` when it is absent."""
    phrase = reference_phrase(spec)
    return f"SPEC-diff is {phrase}" if phrase else ""


# --------------------------------------------------------------------------------------------- mode flags
# One closed set of codes: every view (headline, "Modes at a glance", cards, CLI summary, `spec-torch
# summarize`, the matrix report) renders a mode's ``flags`` from spec.json / matrix.json through this table and
# decides nothing itself. The library decides the facts the codes stand for (uniformity, the verdict
# ``support``, ``tied_size``, ``below_resolution``); :func:`mode_flag_codes` only reads them.
#: code -> (short label for tables and the CLI, one plain-words sentence for cards and the glossary)
FLAGS: dict[str, tuple[str, str]] = {
    "uniform": (
        "uniform: kernel levels, not a group",
        "Scores every sample about alike: a difference in the two kernels' average similarity, not a group "
        "of samples (rerun with center=true to remove it).",
    ),
    "tied": (
        "tied with other modes",
        "Its eigenvalue is within sampling noise of its neighbours': the tied modes together span a real "
        "difference, but no one of them is an identifiable group on its own.",
    ),
    "not_distinct": (
        "not a distinct cluster",
        "Its strength carries over to held-out samples, but resampled data sets do not reproduce this one "
        "direction: real as part of a subspace, not as one cluster.",
    ),
    "not_supported": (
        "not supported by the data",
        "On held-out samples its strength does not carry over: likely sampling noise.",
    ),
    "below_resolution": (
        "below numerical resolution",
        "Its eigenvalue or its gap to a neighbour is below the error of the route that computed it: the "
        "number and its samples are not reliable.",
    ),
    "contradictory": (
        "contradictory: its top samples are tighter under the other embedding",
        "Its sign says one embedding holds its top samples together, but they are tighter (higher mean "
        "kernel value) under the other: the listed samples are not the group the eigenvalue speaks of.",
    ),
}

#: what an unflagged mode's verdict ``supported`` means (cards and the glossary)
SUPPORTED_MEANING = (
    "Supported by the data: its strength carries over to held-out samples and it reappears in resampled data."
)

#: the library's verdicts (spec.json mode ``support``) that carry a flag
_SUPPORT_FLAG = {
    "tied": "tied",
    "not a distinct cluster": "not_distinct",
    "not supported by the data": "not_supported",
}


def mode_flag_codes(entry: Mapping[str, Any], threshold: float = UNIFORM_THRESHOLD) -> list[str]:
    """The flag codes of one spec.json (or matrix.json pair) mode entry, in :data:`FLAGS` order.

    Reads only the entry's fields: ``uniformity``, ``support``, ``tied_size``, ``below_resolution``, and
    ``eigenvalue`` with ``tightness_x``/``tightness_y`` (contradictory: a mode of x, eigenvalue > 0, whose top
    samples are tighter under y, or the reverse; not raised beside ``uniform``, which already says the top
    samples are no group). A field that is absent raises no flag.
    """
    codes = set()
    u = _uniformity(entry)
    if u is not None and u > threshold:
        codes.add("uniform")
    if int(entry.get("tied_size") or 1) > 1:
        codes.add("tied")
    code = _SUPPORT_FLAG.get(entry.get("support") or "")
    if code:
        codes.add(code)
    if entry.get("below_resolution"):
        codes.add("below_resolution")
    tx, ty, lam = entry.get("tightness_x"), entry.get("tightness_y"), entry.get("eigenvalue")
    if tx is not None and ty is not None and lam and "uniform" not in codes:  # uniform says it all
        own, other = (tx, ty) if float(lam) > 0 else (ty, tx)
        if float(own) < float(other):
            codes.add("contradictory")
    return [c for c in FLAGS if c in codes]


def entry_flags(entry: Mapping[str, Any]) -> list[str]:
    """The codes a view renders for one mode entry: its stored ``flags`` (spec.json, written by the job), or,
    for an entry written before ``flags`` existed, :func:`mode_flag_codes` of it (the same rule)."""
    stored = entry.get("flags")
    return list(stored) if stored is not None else mode_flag_codes(entry)


def flag_label(code: str, entry: Mapping[str, Any] | None = None) -> str:
    """The short label of one flag code from :data:`FLAGS`; ``tied`` names the size of its set from the
    entry's ``tied_size`` ("tied: one of 3 directions within noise"). An unknown code is shown as itself."""
    if code == "tied" and entry is not None and int(entry.get("tied_size") or 1) > 1:
        return f"tied: one of {int(entry['tied_size'])} directions within noise"
    return FLAGS[code][0] if code in FLAGS else str(code)


def flag_labels(entry: Mapping[str, Any]) -> list[str]:
    """The short labels of a mode entry's flags (:func:`entry_flags`), in :data:`FLAGS` order."""
    return [flag_label(c, entry) for c in entry_flags(entry)]
