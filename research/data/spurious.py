"""A controlled spurious correlation for text classification: the text analogue of IRM's Colored MNIST.

Colored MNIST (Arjovsky et al. 2019, section 5.1) makes a digit's colour predict the label better than its
shape does in the training environments (90% and 80% agreement), and worse than chance at test (10%), with
25% label noise so that shape alone reaches only 75%. Here the "colour" is a marker word prepended to the
sentence, one word per label, and the "shape" is the sentence itself:

1. every label is flipped with probability `label_noise` (in every split, as in Colored MNIST: the text
   then predicts the noisy label at best 1 - label_noise of the time, and so does the oracle);
2. training examples are dealt at random into one environment per entry of `train_agreements`;
   the dev split (and every `data.test` set) is one test environment with `dev_agreement`;
3. each example gets the marker of its noisy label with probability `agreement` of its environment, the
   marker of another label otherwise; `oracle` skips this step (the ceiling: no spurious cue at all).

Everything is drawn from a generator seeded by (`seed`, split name), so every training seed, framework and
machine sees the same data.
"""

from __future__ import annotations

import zlib

import numpy as np

from research.config import SpuriousConfig
from research.data.split import DataError


def apply(cfg: SpuriousConfig, texts: list[str], labels: np.ndarray, split: str, num_labels: int
          ) -> tuple[list[str], np.ndarray, np.ndarray, tuple[str, ...]]:
    """(texts with markers, noisy labels, environment ids, environment names) for one split."""
    if len(cfg.markers) != num_labels:
        raise DataError(f"data.spurious.markers={cfg.markers} has {len(cfg.markers)} words for {num_labels} labels: "
                        "give one marker word per label, in label id order")
    # zlib.crc32, not hash(): Python salts str hashes per process.
    rng = np.random.default_rng([cfg.seed, zlib.crc32(split.encode())])
    n = len(texts)
    flip = rng.random(n) < cfg.label_noise
    # A flipped label becomes a different label, uniformly among the others (binary: the other one).
    shift = rng.integers(1, num_labels, n) if num_labels > 1 else np.zeros(n, np.int64)
    noisy = np.where(flip, (labels + shift) % num_labels, labels).astype(np.int32)
    if split == "train":
        names = tuple(f"agree{a:g}" for a in cfg.train_agreements)
        if len(set(names)) != len(names):
            names = tuple(f"env{i}_agree{a:g}" for i, a in enumerate(cfg.train_agreements))
        envs = rng.permutation(np.arange(n) % len(cfg.train_agreements)).astype(np.int32)  # equal-sized
        agreement = np.asarray(cfg.train_agreements)[envs]
    else:
        names = (f"test_agree{cfg.dev_agreement:g}",)
        envs = np.zeros(n, np.int32)
        agreement = np.full(n, cfg.dev_agreement)
    agree = rng.random(n) < agreement
    other = (noisy + (rng.integers(1, num_labels, n) if num_labels > 1 else 0)) % num_labels
    marker_label = np.where(agree, noisy, other)
    if cfg.oracle:
        marked = list(texts)
    else:
        marked = [f"{cfg.markers[m]} {text}" for m, text in zip(marker_label, texts, strict=True)]
    return marked, noisy, envs, names
