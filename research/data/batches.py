"""Which examples go into which batch, and the batches themselves.

Training batches follow a plan: a plain shuffle, environment-stratified batches, or counterfactual-pair
batches. A plan is a list of (indices (B,), weights (B,)) per batch of one epoch, drawn from (seed, epoch)
alone, so a resumed run replays exactly the batches an uninterrupted one saw. Batches have static shapes:
`batch_size` rows (filler rows carry weight 0), padded to a bucket (`collate`) or packed (`pack`).

The train step splits a batch into `groups = micro_batches * shards` consecutive blocks of B / groups
examples (micro-batch a, device shard d is block a * shards + d; `put_batch`). The invariants the
objectives rely on are therefore stated per block:

- environments: every block holds every environment, in the same fixed counts (from
  `data.environment_proportions`), so each device shard of each micro-batch sees every environment;
- pairs: the two members of a pair are examples 2p and 2p+1 of a block, never split across blocks.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from research.batch import Batch
from research.data.split import DataError, Split

Plan = list[tuple[np.ndarray, np.ndarray]]


def bucket_length(lengths: np.ndarray, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds the longest example."""
    longest = int(lengths.max())
    return next(b for b in buckets if b >= longest)


def collate(split: Split, indices: np.ndarray, weights: np.ndarray, length: int, pad_id: int) -> Batch:
    """Rows `indices` padded on the right to `length`, one example a row."""
    n = len(indices)
    fields = {
        "input_ids": np.full((n, length), pad_id, np.int32),
        "attention_mask": np.zeros((n, length), np.int32),
        "labels": split.labels[indices],
        "weights": weights.astype(np.float32),  # 0 for filler rows: they count in no loss and no metric
        **_example_keys(split, indices),
    }
    if split.token_type_ids is not None:
        fields["token_type_ids"] = np.zeros((n, length), np.int32)
    if split.token_targets is not None:  # token targets (B, T): -1 (no target, padding) weighs 0
        targets = np.full((n, length), -1, np.int32)
    token_teacher = _token_teacher(split, (n, length))
    for row, i in enumerate(indices):
        ids = split.input_ids[i]
        fields["input_ids"][row, : len(ids)] = ids
        fields["attention_mask"][row, : len(ids)] = 1
        if split.token_type_ids is not None:
            fields["token_type_ids"][row, : len(ids)] = split.token_type_ids[i]
        if split.token_targets is not None:
            targets[row, : len(ids)] = split.token_targets[i]
        if token_teacher is not None:
            token_teacher[row, : len(ids)] = split.teacher_logits[i]
    if token_teacher is not None:
        fields["teacher_logits"] = token_teacher
    if split.token_targets is not None:
        fields["label_weights"] = (targets >= 0) * fields["weights"][:, None]
        fields["labels"] = np.maximum(targets, 0)  # a valid index everywhere; the weight says what counts
    return Batch(**fields)


def pack(split: Split, indices: np.ndarray, weights: np.ndarray, row_length: int, pad_id: int,
         micro_batches: int = 1, shards: int = 1) -> Batch:
    """Examples `indices` packed side by side into rows of `row_length` tokens, instead of one padded row each.

    Short sentences leave most of a padded batch empty (SST-2: 13 real tokens on average against 40 padded
    ones), and the dense layers pay for every slot. Packed, each row holds several examples; `segment_ids`
    (1, 2, ... per example, 0 for padding) keep attention inside each example and `position_ids` restart at
    0, so every example's logits are those of the padded layout (tested). The examples stay the batch's
    examples: labels, weights and `pool_index` (E, 2), the (row, position) of each example's first token. A
    token task (tagging) packs its token targets the same way: `labels` and `label_weights` (R, L) follow the
    tokens, each weighted by its example's weight.

    The batch is cut into `micro_batches * shards` consecutive groups of examples (the layout `put_batch`
    makes: micro-batch a, device shard d is group a * shards + d), and each group is packed into its own
    rows (first-fit decreasing), so no example crosses a device or a micro-batch. All groups get the same
    number of rows R, the largest any group needs; rows are laid out group after group, (groups * R, L),
    and `pool_index` rows count from the start of the example's micro-batch (what the objective sees).
    The step compiles once per distinct R, at most batch_size / groups values.
    """
    n, groups = len(indices), micro_batches * shards
    if n % groups:
        raise DataError(f"a batch of {n} examples cannot be split into {micro_batches} micro-batches x {shards} "
                        "shards")
    per_group = n // groups
    lengths = [len(split.input_ids[i]) for i in indices]
    if max(lengths) > row_length:
        raise DataError(f"an example of {max(lengths)} tokens does not fit a packed row of {row_length}: set "
                        "data.pack_length to at least data.max_length")
    layout = []  # per group: rows, each a list of the batch positions it holds, in packing order
    for g in range(groups):
        rows, free = [], []
        # Longest first (ties in batch order, so the layout is a function of the batch alone).
        for j in sorted(range(g * per_group, (g + 1) * per_group), key=lambda j: -lengths[j]):
            r = next((r for r, room in enumerate(free) if room >= lengths[j]), None)
            if r is None:
                rows.append([])
                free.append(row_length)
                r = len(rows) - 1
            rows[r].append(j)
            free[r] -= lengths[j]
        layout.append(rows)
    n_rows = max(len(rows) for rows in layout)
    shape = (groups * n_rows, row_length)
    fields = {
        "input_ids": np.full(shape, pad_id, np.int32),
        "attention_mask": np.zeros(shape, np.int32),
        "position_ids": np.zeros(shape, np.int32),
        "segment_ids": np.zeros(shape, np.int32),
        "pool_index": np.zeros((n, 2), np.int32),
        "labels": split.labels[indices],
        "weights": weights.astype(np.float32),
        **_example_keys(split, indices),
    }
    if split.token_type_ids is not None:
        fields["token_type_ids"] = np.zeros(shape, np.int32)
    if split.token_targets is not None:  # token targets (R, L): -1 (no target, padding) weighs 0
        targets, token_weights = np.full(shape, -1, np.int32), np.zeros(shape, np.float32)
    token_teacher = _token_teacher(split, shape)
    for g, rows in enumerate(layout):
        for r, members in enumerate(rows):
            row, start = g * n_rows + r, 0
            for segment, j in enumerate(members, start=1):
                i, end = indices[j], start + lengths[j]
                fields["input_ids"][row, start:end] = split.input_ids[i]
                fields["attention_mask"][row, start:end] = 1
                if split.token_type_ids is not None:
                    fields["token_type_ids"][row, start:end] = split.token_type_ids[i]
                fields["position_ids"][row, start:end] = np.arange(lengths[j])
                if split.token_targets is not None:
                    targets[row, start:end] = split.token_targets[i]
                    token_weights[row, start:end] = fields["weights"][j]
                if token_teacher is not None:
                    token_teacher[row, start:end] = split.teacher_logits[i]
                fields["segment_ids"][row, start:end] = segment
                fields["pool_index"][j] = ((g % shards) * n_rows + r, start)  # row within its micro-batch
                start = end
    if token_teacher is not None:
        fields["teacher_logits"] = token_teacher
    if split.token_targets is not None:
        fields["label_weights"] = (targets >= 0) * token_weights
        fields["labels"] = np.maximum(targets, 0)  # a valid index everywhere; the weight says what counts
    return Batch(**fields)


def _example_keys(split: Split, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Per-example batch entries beside labels and weights: `environment` ids, `pair_ids` and a sequence
    task's `teacher_logits`, when present."""
    out = {}
    if split.environments is not None:
        out["environment"] = split.environments[indices]
    if split.pair_ids is not None:
        out["pair_ids"] = split.pair_ids[indices]
    if split.teacher_logits is not None and split.token_targets is None:
        out["teacher_logits"] = split.teacher_logits[indices]  # (E, C)
    return out


def _token_teacher(split: Split, shape: tuple[int, int]) -> np.ndarray | None:
    """Zeros (R, T, C) to place a token task's teacher logits in, or None without them."""
    if split.teacher_logits is None or split.token_targets is None:
        return None
    return np.zeros((*shape, split.teacher_logits[0].shape[-1]), np.float32)


def epoch_batches(split: Split, batch_size: int, buckets: tuple[int, ...], pad_id: int, seed: int, epoch: int,
                  start: int = 0, *, pack_length: int | None = None, micro_batches: int = 1, shards: int = 1,
                  proportions: tuple[float, ...] | None = None) -> Iterator[tuple[int, Batch]]:
    """(batch index, batch) for one training epoch (`epoch_plan`), from batch `start` on (resuming mid-epoch).
    With `pack_length`, batches are packed for `micro_batches` x `shards`; otherwise padded to a bucket."""
    lengths = np.array([len(x) for x in split.input_ids])
    plan = epoch_plan(split, batch_size, seed, epoch, micro_batches * shards, proportions)
    for b in range(start, len(plan)):
        indices, weights = plan[b]
        if pack_length is None:
            yield b, collate(split, indices, weights, bucket_length(lengths[indices], buckets), pad_id)
        else:
            yield b, pack(split, indices, weights, pack_length, pad_id, micro_batches, shards)


def steps_per_epoch(split: Split, batch_size: int, groups: int = 1, proportions: tuple[float, ...] | None = None
                    ) -> int:
    return len(epoch_plan(split, batch_size, 0, 0, groups, proportions))


def eval_batches(split: Split, batch_size: int, buckets: tuple[int, ...], pad_id: int,
                 order: np.ndarray | None = None) -> Iterator[tuple[int, Batch]]:
    """Every example once (or those of `order`, in that order), padded; the last batch filled with weight-0
    rows."""
    lengths = np.array([len(x) for x in split.input_ids])
    order = np.arange(len(split)) if order is None else np.asarray(order)
    for b, start in enumerate(range(0, len(order), batch_size)):
        indices, weights = fill(order[start : start + batch_size], batch_size)
        yield b, collate(split, indices, weights, bucket_length(lengths[indices], buckets), pad_id)


def epoch_plan(split: Split, batch_size: int, seed: int, epoch: int, groups: int = 1,
               proportions: tuple[float, ...] | None = None) -> Plan:
    """The batches of one epoch: pairs if the split has them, else environments if it has them, else a
    shuffle. Pairs win because a pair batch already balances CAD-style data (one member per environment)."""
    if split.pair_ids is not None:
        return pair_plan(split.pair_ids, batch_size, seed, epoch, groups)
    if split.environments is not None:
        return environment_plan(split.environments, len(split.environment_names), batch_size, seed, epoch, groups,
                                proportions)
    return shuffle_plan(len(split), batch_size, seed, epoch)


def shuffle_plan(n: int, batch_size: int, seed: int, epoch: int) -> Plan:
    """A permutation cut into batches; the last one filled with weight-0 repeats (every example once)."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return [fill(order[b : b + batch_size], batch_size) for b in range(0, n, batch_size)]


def fill(indices: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The last batch of an epoch filled up with weight-0 repeats, so the shape stays static."""
    weights = np.ones(batch_size, np.float32)
    if len(indices) < batch_size:
        weights[len(indices):] = 0.0
        indices = np.resize(indices, batch_size)
    return indices, weights


def environment_counts(n_envs: int, block: int, proportions: tuple[float, ...] | None) -> np.ndarray:
    """Examples per environment in a block of `block` examples: the proportions, rounded so they sum to
    `block` exactly (largest remainders), each at least 1."""
    p = np.ones(n_envs) if proportions is None else np.asarray(proportions, float)
    if len(p) != n_envs:
        raise DataError(f"data.environment_proportions has {len(p)} entries for {n_envs} environments")
    exact = p / p.sum() * block
    counts = np.floor(exact).astype(int)
    counts[np.argsort(-(exact - counts), kind="stable")[: block - counts.sum()]] += 1
    if (counts < 1).any():
        raise DataError(f"a block of {block} examples (train.batch_size / (grad_accum x devices)) cannot hold all "
                        f"{n_envs} environments in proportions {tuple(p)}: per-block counts would be "
                        f"{counts.tolist()}; raise train.batch_size")
    return counts


def environment_plan(envs: np.ndarray, n_envs: int, batch_size: int, seed: int, epoch: int, groups: int = 1,
                     proportions: tuple[float, ...] | None = None) -> Plan:
    """Every block of every batch holds `environment_counts` examples of each environment, environment by
    environment. The epoch ends when every example has been drawn once; an environment that runs out
    before the others starts a fresh permutation (it is oversampled: `oversampling` reports by how much)."""
    if batch_size % groups:
        raise DataError(f"train.batch_size={batch_size} does not divide into {groups} blocks")
    counts = environment_counts(n_envs, batch_size // groups, proportions)
    members = [np.flatnonzero(envs == e) for e in range(n_envs)]
    empty = [e for e in range(n_envs) if len(members[e]) == 0]
    if empty:
        raise DataError(f"environment ids {empty} have no training examples; every environment must be present")
    per_batch = counts * groups
    steps = max(-(-len(m) // k) for m, k in zip(members, per_batch, strict=True))
    streams = []
    for e, m in enumerate(members):  # each environment's draws: permutations of it, back to back
        rng = np.random.default_rng([seed, epoch, e])
        need = steps * per_batch[e]
        streams.append(np.concatenate([m[rng.permutation(len(m))] for _ in range(-(-need // len(m)))])[:need])
    plan = []
    for b in range(steps):
        blocks = []
        for g in range(groups):
            start = b * groups + g
            blocks += [streams[e][start * counts[e] : (start + 1) * counts[e]] for e in range(n_envs)]
        indices = np.concatenate(blocks)
        plan.append((indices, np.ones(batch_size, np.float32)))
    return plan


def oversampling(envs: np.ndarray, n_envs: int, batch_size: int, groups: int,
                 proportions: tuple[float, ...] | None) -> dict[int, float]:
    """Draws per example per epoch for each environment (1.0: each example once)."""
    counts = environment_counts(n_envs, batch_size // groups, proportions) * groups
    sizes = [int((envs == e).sum()) for e in range(n_envs)]
    steps = max(-(-s // k) for s, k in zip(sizes, counts, strict=True))
    return {e: steps * counts[e] / sizes[e] for e in range(n_envs)}


def pair_plan(pair_ids: np.ndarray, batch_size: int, seed: int, epoch: int, groups: int = 1) -> Plan:
    """Pairs shuffled and laid out member by member: pair p of a batch at examples 2p, 2p+1. A block holds
    whole pairs because it has an even number of examples. The last batch is filled with weight-0 pairs."""
    if batch_size % groups or (batch_size // groups) % 2:
        raise DataError(f"train.batch_size={batch_size} over {groups} blocks (grad_accum x devices) leaves blocks of "
                        f"{batch_size / groups:g} examples; pair batches need an even number per block")
    members = np.argsort(pair_ids, kind="stable").reshape(-1, 2)  # (P, 2): the two members of each pair
    order = np.random.default_rng([seed, epoch]).permutation(len(members))
    half = batch_size // 2
    plan = []
    for b in range(0, len(order), half):
        pairs, weights = fill(order[b : b + half], half)
        plan.append((members[pairs].reshape(-1), np.repeat(weights, 2)))  # (half, 2) -> (B,): side by side
    return plan
