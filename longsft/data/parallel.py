"""Work units encoded over processes, their results in input order: this process and num_proc - 1 forked workers
(pre_tokenize.py's --num_proc). A worker that dies stops the run with a message instead of a hang.

    from longsft.data.parallel import in_order, worker_pool
    with worker_pool(num_proc - 1, init_worker, init_args) as pool:
        for unit, result in in_order(pool, units, num_proc, work, describe, intact):
            ...   # results in the order of `units`, whoever encoded them

    python -m pytest -q tests/data/test_races_and_disk.py -k killed     # a worker SIGKILLed mid-run (seconds)

concurrent.futures, not multiprocessing.Pool: when a worker dies (the out-of-memory killer, a scheduler, a crash),
the executor marks every unit it holds broken, where Pool replaced the worker and waited for the lost unit forever.
Standard library only (pre-tokenization runs without torch).
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

from longsft.data.inputs import InputError


class WorkerDied(InputError):
    """A worker process ended without a result (killed: the out-of-memory killer, a scheduler; or crashed)."""


@contextmanager
def worker_pool(workers: int, initializer: Callable[..., None], initargs: tuple):
    """A ProcessPoolExecutor of `workers` processes (forked where the platform can). Left by an exception (a user
    error found in a result, Ctrl-C, SIGTERM, a dead worker), it stops its workers at once, as multiprocessing.Pool
    did, instead of waiting for the units in flight (the executor has no public way to: its process table is
    private, hence the getattr)."""
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=initializer, initargs=initargs)
    try:
        yield pool
    except BaseException:
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def in_order(pool: ProcessPoolExecutor, units: Iterable, num_proc: int, work: Callable[[Any], Any],
             describe: Callable[[list], str], intact: str = "") -> Iterator[tuple[Any, Any]]:
    """(unit, work(unit)) in input order, computed by the num_proc - 1 pool workers and by this process, which
    works on the next unit itself whenever the oldest unit in the pool is not done yet (rather than wait).
    Bounded memory: at most 2 units per worker in flight and 2 * num_proc finished here waiting their turn.
    A dead worker raises WorkerDied naming the units that were in the pool (`describe(units)`), ending with
    `intact` (what became of the output)."""
    pending: deque = deque()  # (unit, Future of a worker or the result made here), in input order
    units, in_pool, done_here = iter(units), 0, 0
    try:
        while True:
            while in_pool < 2 * (num_proc - 1) and (unit := next(units, None)) is not None:
                pending.append((unit, None))  # (the unit is in the pool's hands from here)
                pending[-1] = (unit, pool.submit(work, unit))
                in_pool += 1
            if not pending:
                return
            unit, res = pending[0]
            pooled = isinstance(res, Future)
            if pooled and not res.done() and done_here < 2 * num_proc:
                nxt = next(units, None)
                if nxt is not None:
                    pending.append((nxt, work(nxt)))
                    done_here += 1
                    continue
            out = res.result() if pooled else res
            pending.popleft()
            if pooled:
                in_pool -= 1
            else:
                done_here -= 1
            yield unit, out
    except BrokenProcessPool:
        lost = [u for u, r in pending if r is None or isinstance(r, Future)]
        raise WorkerDied(f"a pre-tokenization worker process died{exit_statuses(pool)} while it encoded one of these "
                         f"records: {describe(lost)}. A worker ends like this when the system kills it (the kernel's "
                         f"out-of-memory killer, a scheduler) or when it crashes. Run again (with fewer --num_proc if "
                         f"memory ran out: each process holds a tokenizer and its work units); --num_proc 1 encodes in "
                         f"this process alone, where a crash shows its own error. {intact}") from None


def exit_statuses(pool: ProcessPoolExecutor) -> str:
    """' (killed by SIGKILL)' and the like: how the pool's dead workers ended, where the executor still knows
    (its process table is private; empty when it is not there). The workers it stopped itself end by SIGTERM.
    The executor's own thread reaps them too: when it reaps one in the same instant as this thread, this thread's
    waitpid fails (ECHILD) and the exit code is stored by the other a moment later, hence the short wait."""
    ends, deadline = set(), time.monotonic() + 2.0
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        proc.join(max(0.0, deadline - time.monotonic()))
        code = proc.exitcode
        while code is None and time.monotonic() < deadline:  # (is_alive() would say True in that instant)
            time.sleep(0.01)
            code = proc.exitcode
        if code is not None and code < 0 and -code != signal.SIGTERM:
            try:
                ends.add(f"killed by {signal.Signals(-code).name}")
            except ValueError:
                ends.add(f"killed by signal {-code}")
        elif code is not None and code > 0:
            ends.add(f"exit status {code}")
    return f" ({', '.join(sorted(ends))})" if ends else ""
