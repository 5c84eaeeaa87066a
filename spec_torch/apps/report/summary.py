"""spec.json ``summary``: the finding in plain words that opens ``report.html`` and the CLI output.

:func:`build_summary` reads the spec.json dict only (each mode entry's ``flags``, ``purity``/``labels``, the
eigenvalues, SPEC-diff, its permutation reference and ``spec_diff_centred``) and is the one place the words
are chosen; the report, the CLI summary and ``spec-torch summarize`` render its fields. Its rules:

- a uniform mode (flag ``uniform``) is never described as a group;
- every mode the headline names carries its flags, written ``y1 [label; label]`` with the labels of
  :data:`~spec_torch.apps.report.flags.FLAGS`, so a flagged mode never heads the summary without them (a mode
  whose verdict is not "supported" is flagged, so it is never a finding without its flag);
- when the strongest mode (SPEC-diff's) is uniform, the headline opens with it, gives the centred SPEC-diff
  (spec.json ``spec_diff_centred``, computed by the job from the same sums) and says to read that one.

The dict (documented in docs/reports.md)::

    {"headline": str,                       # the opening paragraph
     "names": {"x": str, "y": str},         # the short names of the two embeddings used in the words
     "spec_diff": float,
     "lead_mode": ["y", 1] | None,          # the reported mode with the largest |eigenvalue| (SPEC-diff's)
     "lead_flags": [code, ...],
     "read": "spec_diff" | "spec_diff_centred",  # which SPEC-diff to read
     "spec_diff_centred": {"value", "how", ...} | None,  # beside a uniform lead
     "findings": [{"direction", "modes": ["x1"], "text"}],  # one sentence per direction, in the headline
     "flagged": {"y1": [code, ...], ...},   # every reported mode with a flag
     "notes": [str, ...]}                   # one line per flag code present: what it means
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..explain import keywords_phrase
from . import flags

__all__ = ["build_summary", "encoder_names", "mode_name", "group_phrase"]


# ------------------------------------------------------------------------------------------ names
def side_setting(spec: Mapping[str, Any], kind: str, side: str) -> Any:
    """``spec[kind + "_" + side]`` or ``spec[kind + "s"][side]`` (e.g. kernel_x or kernels["x"])."""
    direct = spec.get(f"{kind}_{side}")
    if direct is not None:
        return direct
    group = spec.get(f"{kind}s")
    return group.get(side) if isinstance(group, Mapping) else None


def short_name(value: Any, fallback: str) -> str:
    """The name of a settings dict (encoder, kernel, dataset) or the value itself."""
    if isinstance(value, Mapping):
        for key in ("name", "model", "classifier", "family"):
            if value.get(key):
                return str(value[key])
        return fallback
    return str(value) if value else fallback


def weights_tag(encoder: Any) -> str | None:
    """The weights an encoder config names (open_clip pretrained tag, torchvision weights, checkpoint)."""
    if not isinstance(encoder, Mapping):
        return None
    for key in ("pretrained", "weights", "checkpoint"):
        if isinstance(encoder.get(key), str) and encoder[key]:
            return Path(encoder[key]).name if key == "checkpoint" else encoder[key]
    return None


def encoder_names(spec: Mapping[str, Any], given: Mapping[str, str] | None = None) -> dict[str, str]:
    """Short names of the two embeddings: ``given``, else the encoders' model names, else (``data=features``)
    the feature files' stems; the same model on both sides is told apart by its weights, else by side."""
    given = given or {}
    dataset = spec.get("dataset") if isinstance(spec.get("dataset"), Mapping) else {}
    names = {}
    for side in ("x", "y"):
        fallback = f"embedding {side}"
        if dataset.get(f"{side}_path"):
            fallback = Path(str(dataset[f"{side}_path"])).stem
        names[side] = str(given.get(side) or short_name(side_setting(spec, "encoder", side), fallback))
    if names["x"] == names["y"]:
        tags = {side: weights_tag(side_setting(spec, "encoder", side)) for side in ("x", "y")}
        use_tags = tags["x"] != tags["y"] and all(tags.values())
        names = {side: f"{names[side]} ({tags[side] if use_tags else side})" for side in names}
    return names


# ------------------------------------------------------------------------------------------ phrases
def mode_name(direction: str, entry: Mapping[str, Any]) -> str:
    """``"x1"``: the direction and the entry's rank."""
    return f"{direction}{int(entry.get('rank', 1))}"


def tagged(direction: str, entry: Mapping[str, Any]) -> str:
    """``"y1 [uniform: kernel levels, not a group]"``: a mode's name with its flags' labels, or the name."""
    labels = flags.flag_labels(entry)
    return mode_name(direction, entry) + (f" [{'; '.join(labels)}]" if labels else "")


def group_phrase(entry: Mapping[str, Any]) -> str:
    """What a mode's top samples share: ``"100% colour=blue"`` (planted attributes), ``"75% circle"``
    (labels), ``"described by terrier, spaniel"`` (its distinctive words, spec.json ``keywords`` ``[[term, z],
    ...]``, where the data has texts), ``'led by "a caption"'`` (texts) or ``"led by <id>"``."""
    if entry.get("keywords"):  # its distinctive words say best what the group is
        return "described by " + keywords_phrase(entry)
    purity, dominant = entry.get("purity"), entry.get("dominant") or {}
    if purity:
        attr, frac = max(purity.items(), key=lambda kv: float(kv[1]))
        value = dominant.get(attr)
        return f"{float(frac):.0%} {attr}={value}" if value is not None else f"{float(frac):.0%} {attr}"
    if entry.get("labels"):
        label, frac = entry["labels"][0]
        return f"{float(frac):.0%} {label}"
    if entry.get("top_texts"):
        return f'led by "{entry["top_texts"][0]}"'
    ids = entry.get("top_ids") or []
    return f"led by {ids[0]}" if ids else "of unnamed samples"


def _group(entry: Mapping[str, Any]) -> str:
    """:func:`group_phrase` after "a group": ``"that is 100% colour=blue"``, ``"described by ..."``."""
    phrase = group_phrase(entry)
    return phrase if phrase.startswith(("described", "led", "of ")) else f"that is {phrase}"


def _lam(entry: Mapping[str, Any]) -> str:
    return f"λ = {float(entry['eigenvalue']):+.3g}"


def _share(entry: Mapping[str, Any], total: float) -> str:
    return f"{abs(float(entry['eigenvalue'])) / total:.0%} of the |spectrum|"


def _tied_set(entry: Mapping[str, Any], tied_modes: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The spec.json ``tied_modes`` entry of a mode's tied set (its ``tied_set`` index), or None."""
    t = entry.get("tied_set")
    return tied_modes[t] if isinstance(t, int) and 0 <= t < len(tied_modes) else None


def _set_phrase(
    tied: Mapping[str, Any], direction: str, entries: Sequence[Mapping[str, Any]], total: float
) -> str:
    """What a tied set holds, in words: its own ``keywords`` (named once from the members of any of its modes)
    or, without texts, each reported member's group; and its share of the |spectrum|."""
    ranks = {int(r) for d, r in tied.get("modes") or [] if d == direction}
    members = [e for e in entries if int(e.get("rank", 1)) in ranks]
    share = f"together {abs(float(tied.get('eigenvalue_sum', 0.0))) / total:.0%} of the |spectrum|"
    if tied.get("keywords"):
        what = "groups described by " + keywords_phrase(tied)
    elif members:
        phrases = [group_phrase(e) for e in members]
        plain = all(not p.startswith(("described", "led", "of ")) for p in phrases)
        listed = ", ".join(phrases[:-1]) + (" and " if len(phrases) > 1 else "") + phrases[-1]
        what = f"groups that are {listed}" if plain else "groups " + "; ".join(phrases)
    else:
        what = "groups"
    return f"{what} ({share})"


def _direction_finding(
    direction: str,
    entries: Sequence[Mapping[str, Any]],
    names: Mapping[str, str],
    total: float,
    lead_told: bool = False,
    tied_modes: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """One sentence on the strongest modes of one sign; uniform modes are named as such, never as groups, and a
    tied lead as one of its set, whose span (not any one direction) holds the groups.
    ``lead_told``: the headline has already described this sign's uniform lead (SPEC-diff's mode)."""
    other = "y" if direction == "x" else "x"
    me, them = names[direction], names[other]
    lead = entries[0]
    count = f"{len(entries)} mode{'s' if len(entries) > 1 else ''} of this kind reported"
    named = [] if lead_told else [mode_name(direction, lead)]
    if "uniform" in flags.entry_flags(lead):
        group = next((e for e in entries[1:] if "uniform" not in flags.entry_flags(e)), None)
        text = (
            ""
            if lead_told
            else f"{me}'s strongest mode, {tagged(direction, lead)} ({_lam(lead)}), scores every sample about "
            "alike: a difference in the kernels' average similarity, not a group. "
        )
        if group is None:
            text += f"No other reported mode of {me} is a group ({count})."
        else:
            named.append(mode_name(direction, group))
            text += (
                f"The strongest group {me} holds together and {them} does not is {tagged(direction, group)}: "
                f"{group_phrase(group)} ({_lam(group)}, {_share(group, total)})."
            )
    elif "tied" in flags.entry_flags(lead) and _tied_set(lead, tied_modes) is not None:
        size = int(lead.get("tied_size") or len(_tied_set(lead, tied_modes)["modes"]))
        text = (
            f"{me}'s strongest mode, {tagged(direction, lead)} ({_lam(lead)}), is one of {size} directions that "
            f"resampling does not tell apart: no one of them is a group on its own, but together they hold "
            f"{_set_phrase(_tied_set(lead, tied_modes), direction, entries, total)}, which {them} does not."
        )
    elif flags.entry_flags(lead):
        text = (
            f"{me}'s strongest mode, {tagged(direction, lead)} ({_lam(lead)}, {_share(lead, total)}; {count}), "
            f"points to a group {_group(lead)}, which {them} does not hold together."
        )
    else:
        text = (
            f"{me} holds together a group {_group(lead)}, which {them} does not "
            f"({mode_name(direction, lead)}: {_lam(lead)}, {_share(lead, total)}; {count})."
        )
    return {"direction": direction, "modes": named, "text": text}


def _lead(modes: Mapping[str, Sequence[Mapping[str, Any]]]) -> tuple[str, Mapping[str, Any]] | None:
    """The reported mode of largest |eigenvalue| (x first on a tie)."""
    best = None
    for direction in ("x", "y"):
        for entry in modes.get(direction) or []:
            if best is None or abs(float(entry["eigenvalue"])) > abs(float(best[1]["eigenvalue"])):
                best = (direction, entry)
    return best


# ------------------------------------------------------------------------------------------ the summary
def build_summary(spec: Mapping[str, Any], names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The spec.json ``summary`` dict (see the module docstring) from the spec.json dict alone.

    Args:
        spec: the spec.json dict: ``eigenvalues``, ``spec_diff``, ``modes`` (entries with ``rank``,
            ``eigenvalue`` and ``flags`` or the fields :func:`flags.mode_flag_codes` reads), optionally
            ``spec_diff_ratio``/``spec_diff_null``, ``spec_diff_centred``, ``encoders``, ``dataset``.
        names: short names of the embeddings (default :func:`encoder_names`).
    """
    names = dict(names or encoder_names(spec))
    modes = {d: sorted(spec.get("modes", {}).get(d) or [], key=lambda e: int(e.get("rank", 1))) for d in "xy"}
    eig = [abs(float(v)) for v in spec.get("eigenvalues") or [] if v is not None]
    total = sum(eig) or 1.0
    sd = spec.get("spec_diff")
    sd = float(sd) if isinstance(sd, (int, float)) else None
    flagged = {mode_name(d, e): flags.entry_flags(e) for d in "xy" for e in modes[d] if flags.entry_flags(e)}
    out: dict[str, Any] = {
        "headline": "",
        "names": names,
        "spec_diff": sd,
        "lead_mode": None,
        "lead_flags": [],
        "read": "spec_diff",
        "spec_diff_centred": None,
        "findings": [],
        "flagged": flagged,
        "notes": [],
    }
    lead = _lead(modes)
    told = lead[0] if lead is not None and "uniform" in flags.entry_flags(lead[1]) else None
    tied_modes = spec.get("tied_modes") or []
    findings = [
        _direction_finding(d, modes[d], names, total, lead_told=d == told, tied_modes=tied_modes)
        for d in "xy"
        if modes[d]
    ]
    out["findings"] = findings
    if lead is None:
        out["headline"] = (
            "No mode was reported, so this run says nothing about which groups either encoder holds."
        )
        return out
    direction, entry = lead
    out["lead_mode"] = [direction, int(entry.get("rank", 1))]
    out["lead_flags"] = flags.entry_flags(entry)
    sd_text = f"{sd:.3g}" if sd is not None else f"{abs(float(entry['eigenvalue'])):.3g}"
    sentences = []
    if "uniform" in out["lead_flags"]:
        u = entry.get("uniformity")
        centred = (
            spec.get("spec_diff_centred") if isinstance(spec.get("spec_diff_centred"), Mapping) else None
        )
        opening = (
            f"The largest difference, SPEC-diff = {sd_text}, is mode {tagged(direction, entry)}"
            + (f" (uniformity {float(u):.2f})" if u is not None else "")
            + ": it measures how the two kernels' average similarity differs, not a group."
        )
        if centred and centred.get("value") is not None:
            out["read"] = "spec_diff_centred"
            out["spec_diff_centred"] = dict(centred)
            opening += (
                f" Read the centred SPEC-diff instead: {float(centred['value']):.3g} (both kernels centred; "
                f"{str(centred.get('how', 'a second solve')).split(':')[0]}), which compares groups only."
            )
        else:
            opening += " Rerun with center=true (both kernels centred) to compare groups only."
        sentences.append(opening)
        sentences += [f["text"] for f in findings]
    else:
        sentences += [f["text"] for f in findings]
        reference = flags.reference_phrase(spec)
        sentences.append(
            f"SPEC-diff, the largest |λ|, is {sd_text} (mode {tagged(direction, entry)})"
            + (f", {reference}." if reference else ".")
        )
    out["headline"] = " ".join(sentences)
    for code in flags.FLAGS:
        which = [m for m, codes in flagged.items() if code in codes]
        if which:
            out["notes"].append(f"{', '.join(which)}: {flags.FLAGS[code][0]}. {flags.FLAGS[code][1]}")
    return out
