"""The cost of naming modes in words (spec_torch/apps/explain.py) against the SPEC work of the compare job.

    python bench/bench_keywords.py            # n = 100,000 texts, D = 768 per side, 6 modes (a few minutes)
    python bench/bench_keywords.py --quick    # n = 10,000, a smoke run

On the same n, measured side by side in one run (one thread, CPU seconds of this process: the machine is shared):

- SPEC: what the compare job does for the result (cosine kernels, features route, float64 sums): stream
  ``[n, 768]`` x and y batch by batch through ``DiffCovariance.update`` (accumulate), ``compute`` (solve), and
  the top-samples pass of 3 + 3 modes (score).
- keywords: :func:`~spec_torch.apps.explain.mode_keywords` on the 6 modes' sample scores and n generated texts
  (12 topics from templates, with filler words): the vectorizer (1-2 grams) and the log-odds.
- explain stage: keywords plus the pass that scores every sample on the 6 modes
  (:func:`~spec_torch.apps.explain.oriented_scores`), what the compare job's explain stage adds in all.

Prints each time and the ratios keywords / SPEC (target <= 0.25) and explain stage / SPEC.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from spec_torch import CosineKernel, DiffCovariance
from spec_torch.apps.explain import mode_keywords, oriented_scores

TOPICS = {
    "weather": "rain storm cloud thunder forecast humid drizzle breeze",
    "cooking": "recipe oven garlic simmer pasta butter roast spice",
    "football": "goal striker referee penalty league keeper match stadium",
    "music": "guitar chorus album concert melody drummer lyrics tour",
    "finance": "stock market bond interest inflation dividend broker loan",
    "space": "rocket orbit planet astronaut telescope galaxy launch moon",
    "gardening": "tulip compost seedling prune soil greenhouse hedge bloom",
    "medicine": "vaccine clinic surgeon dose symptom patient therapy nurse",
    "travel": "airport luggage passport hotel beach ticket journey tourist",
    "computing": "compiler kernel server database laptop software network cache",
    "history": "empire dynasty castle treaty medieval archive battle monarch",
    "fashion": "fabric jacket runway designer silk collar tailor boutique",
}
TEMPLATES = [
    "a short note about {a} and {b} with {f} {g}",
    "today we talked about {a}, {b} and some {f}",
    "{f} {g} {a} {b} {c}",
]


def generated_texts(n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """``n`` texts from templates, each of one of 12 topics (two or three topic words, two filler words from a
    vocabulary of 2,000); and the topic of each."""
    rng = np.random.default_rng(seed)
    topics = [words.split() for words in TOPICS.values()]
    fillers = [f"filler{k}" for k in range(2000)]
    topic = rng.integers(len(topics), size=n)
    picks = rng.integers(8, size=(n, 3))
    fill = rng.integers(len(fillers), size=(n, 2))
    form = rng.integers(len(TEMPLATES), size=n)
    texts = [
        TEMPLATES[form[i]].format(
            a=topics[topic[i]][picks[i, 0]],
            b=topics[topic[i]][picks[i, 1]],
            c=topics[topic[i]][picks[i, 2]],
            f=fillers[fill[i, 0]],
            g=fillers[fill[i, 1]],
        )
        for i in range(n)
    ]
    return texts, topic


def batches(
    n: int, dim: int, topic: np.ndarray, batch: int = 8192
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(x_b [B, dim], y_b [B, dim])`` float32 batches: x clusters by topic, y by another grouping (generated
    once, before any timing: 2 x n x dim x 4 bytes, 0.6 GB at n = 100,000)."""
    out = []
    centres = np.random.default_rng(1).normal(size=(12, dim)).astype(np.float32)
    other = np.random.default_rng(2).normal(size=(7, dim)).astype(np.float32)
    for start in range(0, n, batch):
        rng = np.random.default_rng([3, start])
        stop = min(start + batch, n)
        noise_x = rng.normal(size=(stop - start, dim)).astype(np.float32)
        noise_y = rng.normal(size=(stop - start, dim)).astype(np.float32)
        x = noise_x + 0.6 * centres[topic[start:stop]]
        y = noise_y + 0.6 * other[np.arange(start, stop) % 7]
        out.append((torch.from_numpy(x), torch.from_numpy(y)))
    return out


def cpu_seconds(fn):
    t0 = time.process_time()
    out = fn()
    return time.process_time() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="n = 10,000: a smoke run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import sklearn.feature_extraction.text  # noqa: F401  (imported by the job's metrics before the explain stage)

    n, dim, k = (10_000 if args.quick else 100_000), 768, 3
    texts, topic = generated_texts(n)

    data = batches(n, dim, topic)
    x_all, y_all = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])  # for the anchors only

    def spec():
        acc = DiffCovariance(
            CosineKernel(), CosineKernel(), accumulate_dtype=torch.float64
        )  # the job's default
        for xb, yb in data:
            acc.update(xb, yb)
        res = acc.compute(eta=1.0)
        modes = res.positive_modes(k) + res.negative_modes(k)
        return res, modes, res.top_samples(data, k=16, modes=modes)

    spec_s, (res, modes, top) = cpu_seconds(spec)
    tops = top.indices[:, 0]  # each mode's top sample: its orientation
    anchors = (x_all[tops], y_all[tops])
    score_s, scores = cpu_seconds(lambda: oriented_scores(res, data, modes, anchors))
    words_s, words = cpu_seconds(lambda: mode_keywords(scores, texts))
    print(f"n = {n} texts, D = {dim} per side, {len(modes)} modes; one thread, CPU seconds")
    print(f"  SPEC (accumulate, solve, score top samples) : {spec_s:8.2f} s")
    print(f"  keywords (vectorize {n} texts, log-odds)  : {words_s:8.2f} s   ratio to SPEC {words_s / spec_s:.3f}"
          " (target <= 0.25)")  # fmt: skip
    print(f"  explain stage (score every sample + keywords): {score_s + words_s:8.2f} s   ratio to SPEC "
          f"{(score_s + words_s) / spec_s:.3f}")  # fmt: skip
    for m, terms in zip(modes, words, strict=True):
        print(f"  mode {m:>4d}: " + (", ".join(t for t, _ in terms) or "no distinctive words"))


if __name__ == "__main__":
    main()
