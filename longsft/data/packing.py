"""Packing and ordering of a tokenized dataset's samples (numpy only): the algorithms sort_and_group.py runs.

    from longsft.data.packing import pack_bfd, lower_bound
    order, pack_offsets = pack_bfd(lengths, 32768)   # samples of pack j: order[pack_offsets[j]:pack_offsets[j+1]]

- Packing. `bfd` (default): best-fit decreasing over the whole dataset at once. Items of one length are placed
  together (a best-fit bin takes floor(room / length) of them), and the bins are kept in buckets by remaining
  room with a two-level bitmap to find the tightest bin that fits, so 1M samples pack in well under a second.
  `sequential`: upstream's next-fit in file order (a sample that does not fit closes the pack), keeping the
  last pack and never dropping a sample.
- Compute balance. With --group_size ranks, the packs of one step run in parallel and the step waits for the
  slowest. Modeled cost of a pack = sum(L_i) + sum(L_i^2) / attn_cost_length, L_i its sample lengths: forward
  FLOPs are 2 * params per token for the matmuls and 2 * L^2 * hidden * layers per causal sample for attention,
  so the quadratic term equals the linear one at L = params / (hidden * layers): about 57,000 for GLM-4-9B
  (9.4e9 / (4096 * 40)) and 61,000 for Llama-3.1-8B (8.0e9 / (4096 * 32)); default 57,000. Packs are sorted
  by cost and cut into steps of group_size (similar packs train side by side), then whole steps are shuffled
  with --seed; a shorter last step, if any, comes last. A step still uneven by more than 1% (typically the
  one holding bfd's last, part-filled pack) is re-packed among its own packs, costliest sample first into the
  cheapest pack with room (same pack count). The report gives the modeled imbalance (slowest rank /
  mean, per step) against upstream's next-fit in file order. With another GPU count the balance is only less
  good; nothing that affects the loss depends on it (weights are 1/N_i; normalization happens at training).
- Sorted batching (LMSortDataset): samples sorted by length, cut into groups of group_size, groups shuffled
  with --seed (a shorter last group at the end).
- Preference pairs (longsft/data/pair_packing.py) are items of two samples, never split: their length is the
  pair's and their attention term the sum of both samples' squares (`squares` of pack_costs / repack_uneven_steps).
"""

from __future__ import annotations

import numpy as np

# ----------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------

def lower_bound(lengths: np.ndarray, max_length: int) -> int:
    """No packing can use fewer packs than ceil(total tokens / max_length)."""
    return int(-(-int(np.sum(lengths, dtype=np.int64)) // max_length))


def _offsets_from_bins(item_bin: np.ndarray, num_bins: int) -> np.ndarray:
    offsets = np.zeros(num_bins + 1, dtype=np.int64)
    np.cumsum(np.bincount(item_bin, minlength=num_bins), out=offsets[1:])
    return offsets


def pack_bfd(lengths: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing. lengths: int [n], each in [1, max_length].

    Returns (order, pack_offsets): pack p holds items order[pack_offsets[p]:pack_offsets[p + 1]] (positions
    into `lengths`), longest first. Exact best fit: an item goes to the bin with the least room that fits it.
    Runs of equal length are placed together (the best bin takes floor(room / length) of them; its room is then
    below the length, so the next best bin is looked up), and bins wait in buckets by room: buckets[r] is a
    stack of bins with r tokens free, and a bitmap of non-empty buckets (64-bit words + a summary of non-zero
    words) finds the smallest r >= length in a few integer operations."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n, cap = lengths.size, int(max_length)
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    sorted_len = lengths[order]
    starts = np.concatenate([[0], np.flatnonzero(sorted_len[1:] != sorted_len[:-1]) + 1])
    run_len = sorted_len[starts].tolist()
    run_cnt = np.diff(np.append(starts, n)).tolist()

    words = [0] * ((cap >> 6) + 1)   # bit r & 63 of words[r >> 6]: buckets[r] is not empty
    summary = 0                      # bit w: words[w] != 0
    buckets: list[list[int]] = [[] for _ in range(cap + 1)]
    seg_bin: list[int] = []          # the sorted items, in order, go in segments: seg_cnt[s] items to seg_bin[s]
    seg_cnt: list[int] = []
    num_bins = 0

    def add(room: int, bins) -> None:  # put bins with `room` free into their bucket
        nonlocal summary
        if isinstance(bins, int):
            buckets[room].append(bins)
        else:
            buckets[room].extend(bins)
        w = room >> 6
        if not words[w]:
            summary |= 1 << w
        words[w] |= 1 << (room & 63)

    for x, k in zip(run_len, run_cnt):
        while k:
            w = x >> 6
            m = words[w] >> (x & 63)
            if m:                                   # a bucket in x's own word
                r = x + (m & -m).bit_length() - 1
            else:
                s = summary >> (w + 1)
                if not s:                           # nothing fits: open bins, floor(cap / x) items each
                    q = cap // x
                    full, rest = divmod(k, q)
                    if full:
                        seg_bin.extend(range(num_bins, num_bins + full))
                        seg_cnt.extend([q] * full)
                        if cap - q * x:
                            add(cap - q * x, range(num_bins, num_bins + full))
                        num_bins += full
                    if rest:
                        seg_bin.append(num_bins)
                        seg_cnt.append(rest)
                        if cap - rest * x:
                            add(cap - rest * x, num_bins)
                        num_bins += 1
                    break
                w += (s & -s).bit_length()
                m = words[w]
                r = (w << 6) + (m & -m).bit_length() - 1
            bucket = buckets[r]
            b = bucket.pop()
            if not bucket:
                words[w] &= ~(1 << (r & 63))
                if not words[w]:
                    summary &= ~(1 << w)
            t = min(r // x, k)
            if r - t * x:
                add(r - t * x, b)
            seg_bin.append(b)
            seg_cnt.append(t)
            k -= t
    item_bin = np.repeat(np.asarray(seg_bin, dtype=np.int64), np.asarray(seg_cnt, dtype=np.int64))
    by_bin = np.argsort(item_bin, kind="stable")
    return order[by_bin], _offsets_from_bins(item_bin, num_bins)


def pack_sequential(lengths: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Upstream's next-fit in file order: a sample that does not fit the open pack closes it. Same return as
    pack_bfd; the last pack is kept. One binary search per pack over the running token count."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n = lengths.size
    cum = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=cum[1:])
    bounds, s = [0], 0
    while s < n:
        s = int(np.searchsorted(cum, cum[s] + max_length, side="right")) - 1  # last end that still fits
        bounds.append(s)
    return np.arange(n, dtype=np.int64), np.asarray(bounds, dtype=np.int64)


PACKERS = {"bfd": pack_bfd, "sequential": pack_sequential}


# ----------------------------------------------------------------------------------------------
# Compute balance across the packs of a step, and the sorted-batching order
# ----------------------------------------------------------------------------------------------

def pack_costs(lengths: np.ndarray, order: np.ndarray, pack_offsets: np.ndarray,
               attn_cost_length: float, squares: np.ndarray | None = None) -> np.ndarray:
    """Modeled cost of every pack: tokens + sum of squared sample lengths / attn_cost_length, float64 [packs].
    `squares`: each item's sum of squared sample lengths when an item holds several samples (a preference pair);
    default lengths ** 2."""
    if pack_offsets.size < 2:
        return np.zeros(0)
    return np.add.reduceat(_item_costs(lengths, attn_cost_length, squares)[order], pack_offsets[:-1])


def _item_costs(lengths: np.ndarray, attn_cost_length: float, squares: np.ndarray | None = None) -> np.ndarray:
    ell = np.asarray(lengths, dtype=np.float64)
    sq = ell * ell if squares is None else np.asarray(squares, dtype=np.float64)
    return ell + sq / attn_cost_length


def arrange_steps(costs: np.ndarray, group_size: int, seed: int, balance: bool = True,
                  shuffle: bool = True) -> np.ndarray:
    """Training order of the packs: steps of group_size packs of similar cost (balance), whole steps shuffled
    with seed; the shorter last step (packs % group_size of them, the cheapest) stays last."""
    num = costs.size
    order = np.argsort(-costs, kind="stable") if balance else np.arange(num)
    full = num // group_size
    steps = order[:full * group_size].reshape(full, group_size)
    if shuffle:
        steps = steps[np.random.default_rng([seed, 0]).permutation(full)]
    return np.concatenate([steps.reshape(-1), order[full * group_size:]]).astype(np.int64)


def reorder_packs(order: np.ndarray, pack_offsets: np.ndarray, perm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same packs, pack perm[k] in k-th place."""
    sizes = np.diff(pack_offsets)[perm]
    offsets = np.zeros(perm.size + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    pos = np.repeat(pack_offsets[:-1][perm] - offsets[:-1], sizes) + np.arange(offsets[-1])
    return order[pos], offsets


def repack_uneven_steps(lengths: np.ndarray, order: np.ndarray, pack_offsets: np.ndarray, group_size: int,
                        max_length: int, attn_cost_length: float, tol: float = 1.01,
                        squares: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Steps (runs of group_size packs, the last one may be shorter) whose slowest pack costs more than tol x
    their mean are re-packed: their samples, most expensive first, go to the cheapest of the step's packs that
    has room (LPT), kept only if that is more even. Same packs count; only a few tail steps (e.g. the last,
    part-filled bfd pack) qualify. Returns the new order (pack_offsets may change) and the steps re-packed."""
    order, offsets = order.copy(), pack_offsets.copy()
    cost = _item_costs(lengths, attn_cost_length, squares)
    per_pack = np.add.reduceat(cost[order], offsets[:-1]) if offsets.size > 1 else np.zeros(0)
    repacked = 0
    for first in range(0, per_pack.size, group_size):
        c = per_pack[first:first + group_size]
        if c.size < 2 or c.max() <= tol * c.mean():
            continue
        a, b = offsets[first], offsets[first + c.size]
        items = order[a:b][np.argsort(-cost[order[a:b]], kind="stable")]
        load, room, dest = np.zeros(c.size), np.full(c.size, max_length), np.empty(items.size, dtype=np.int64)
        for k, i in enumerate(items.tolist()):
            fits = np.flatnonzero(room >= lengths[i])
            if fits.size == 0:
                break
            j = fits[np.argmin(load[fits])]
            dest[k], load[j], room[j] = j, load[j] + cost[i], room[j] - lengths[i]
        else:
            if load.max() < c.max():
                by_pack = np.argsort(dest, kind="stable")
                order[a:b] = items[by_pack]
                offsets[first + 1:first + c.size] = a + np.cumsum(np.bincount(dest, minlength=c.size))[:-1]
                per_pack[first:first + c.size] = load
                repacked += 1
    return order, offsets, repacked


def step_imbalance(costs_in_order: np.ndarray, group_size: int) -> dict:
    """Slowest rank / mean of each full step (1.0 = perfect), and the modeled time lost to waiting."""
    full = costs_in_order.size // group_size
    if full == 0:
        return {"steps": 0}
    c = costs_in_order[:full * group_size].reshape(full, group_size)
    ratio = c.max(axis=1) / np.maximum(c.mean(axis=1), 1e-12)
    return {"steps": full, "mean": round(float(ratio.mean()), 4), "p95": round(float(np.quantile(ratio, 0.95)), 4),
            "max": round(float(ratio.max()), 4),
            "time_lost": round(float(c.max(axis=1).sum() / c.mean(axis=1).sum() - 1), 4)}


def sorted_batching_order(lengths: np.ndarray, group_size: int, seed: int, shuffle: bool = True) -> np.ndarray:
    """Positions into `lengths` sorted by length (stable), cut into groups of group_size, groups shuffled with
    seed; the shorter last group (the longest samples) stays last."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    full = order.size // group_size
    groups = order[:full * group_size].reshape(full, group_size)
    if shuffle:
        groups = groups[np.random.default_rng([seed, 1]).permutation(full)]
    return np.concatenate([groups.reshape(-1), order[full * group_size:]]).astype(np.int64)
