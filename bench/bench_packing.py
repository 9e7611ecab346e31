"""Packing benchmark: packs, efficiency and time of `bfd` and `sequential` against the lower bound, and the
modeled step imbalance for 8 ranks, on synthetic LongWriter-like length mixes (lengths only, no tokens).

    python bench/bench_packing.py                      # LongWriter-like mix (186k) and 1M samples, packs of 32,768
    python bench/bench_packing.py --samples 20000      # a quick CPU run: one mix of 20k samples

Mix: 96.8% "general SFT" samples with lognormal lengths (median 600 tokens, sigma 0.8, clipped to [16, max])
plus 3.2% "long output" samples uniform in [3,000, 32,768] (180k + 6k, as LongWriter-6k + ~180k general).
Goals (issue 3): bfd within 0.1% of ceil(tokens / max_length); 1M samples packed in under 2 s.
"""

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from transformers import HfArgumentParser

from longsft.data.packing import (arrange_steps, lower_bound, pack_bfd, pack_costs, pack_sequential,
                            reorder_packs, repack_uneven_steps, sorted_batching_order, step_imbalance)


@dataclass
class Arguments:
    samples: Optional[int] = field(default=None, metadata={"help": "One mix of this size (default: 186k and 1M)."})
    max_length: int = field(default=32768, metadata={"help": "Tokens per pack."})
    ranks: int = field(default=8, metadata={"help": "Packs per step (GPU count) for the imbalance model."})
    attn_cost_length: float = field(default=57000.0, metadata={"help": "Cost model, as in sort_and_group.py."})
    seed: int = field(default=0, metadata={"help": "Seed of the synthetic lengths."})


def longwriter_mix(n: int, max_length: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n_long = round(n * 6000 / 186000)
    short = np.clip(np.rint(rng.lognormal(np.log(600), 0.8, n - n_long)), 16, max_length)
    long_ = rng.integers(3000, min(32768, max_length) + 1, n_long)
    lengths = np.concatenate([short.astype(np.int64), long_])
    rng.shuffle(lengths)   # file order = a shuffled mix, as pre-tokenization writes it
    return lengths


def timed(fn, *a, repeat=3):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn(*a)
        best = min(best, time.perf_counter() - t)
    return out, best


def run(n: int, args: Arguments) -> None:
    lengths = longwriter_mix(n, args.max_length, args.seed)
    lb = lower_bound(lengths, args.max_length)
    print(f"\n== {n:,} samples, {int(lengths.sum()):,} tokens (mean {lengths.mean():.0f}, max {lengths.max():,}), "
          f"packs of {args.max_length:,}: lower bound {lb:,} packs")
    print(f"{'algorithm':<12}{'packs':>9}{'over LB':>18}{'efficiency':>12}{'pack s':>9}{'+steps+sort s':>15}")
    results = {}
    for name, fn in (("bfd", pack_bfd), ("sequential", pack_sequential)):
        (order, offsets), t_pack = timed(fn, lengths, args.max_length)
        t = time.perf_counter()
        costs = pack_costs(lengths, order, offsets, args.attn_cost_length)
        steps = arrange_steps(costs, args.ranks, 42)
        if name == "bfd":   # the default pipeline of sort_and_group.py: balanced steps, uneven ones re-packed
            order, offsets = reorder_packs(order, offsets, steps)
            order, offsets, _ = repack_uneven_steps(lengths, order, offsets, args.ranks, args.max_length,
                                                    args.attn_cost_length)
            costs = pack_costs(lengths, order, offsets, args.attn_cost_length)
            steps = np.arange(costs.size)
        sorted_batching_order(lengths, args.ranks, 42)
        t_rest = time.perf_counter() - t
        packs = offsets.size - 1
        fills = np.add.reduceat(lengths[order], offsets[:-1])
        assert fills.max() <= args.max_length and np.array_equal(np.sort(order), np.arange(n))
        print(f"{name:<12}{packs:>9,}{f'+{packs - lb} ({(packs - lb) / lb:.3%})':>18}"
              f"{lengths.sum() / (packs * args.max_length):>12.4%}{t_pack:>9.3f}{t_rest:>15.3f}")
        results[name] = (costs, steps)
    print(f"modeled step imbalance, {args.ranks} ranks (slowest/mean per step; cost = tokens + sum L^2 / "
          f"{args.attn_cost_length:g}):")
    bfd_costs, bfd_steps = results["bfd"]
    for label, c in (("bfd, balanced steps (default)", bfd_costs[bfd_steps]),
                     ("bfd, packs in random order", bfd_costs[np.random.default_rng(1).permutation(bfd_costs.size)]),
                     ("next-fit, file order (upstream)", results["sequential"][0])):
        s = step_imbalance(c, args.ranks)
        print(f"  {label:<33} mean {s['mean']:.4f}  p95 {s['p95']:.4f}  max {s['max']:.4f}  "
              f"modeled time lost {s['time_lost']:.2%}")


def main(argv=None) -> None:
    (args,) = HfArgumentParser(Arguments).parse_args_into_dataclasses(args=argv)
    for n in ([args.samples] if args.samples else [186_000, 1_000_000]):
        run(n, args)


if __name__ == "__main__":
    main()
