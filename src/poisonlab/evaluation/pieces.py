"""Recorded pieces: an evaluation's independent units run on an executor, each kept in the run.

An evaluation splits its work into pieces (a chunk of tasks at one ε, a backdoored model and its
defences, a victim trained from scratch), each a call of a module-level function on the piece's
own inputs plus the inputs every piece shares (poisonlab.executors). `run_pieces` gives back the
result of every piece: the ones the run already holds are loaded, the others run on the executor
and are saved into the run as each arrives, so an interrupted run resumed later recomputes only
the pieces it had not recorded, whatever executor and order computed the others.

`ThreadExecutor` is the in-process executor of pieces that were already run side by side on
threads (the few-shot chunks): one thread per worker, each with one intra-op thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, TypeVar

from poisonlab.executors import Executor, run_missing
from poisonlab.training.maml import intra_op_threads

R = TypeVar("R")


def run_pieces(executor: Executor | None, fn: Callable[..., R], items: Mapping[str, Any], *,
               load: Callable[[str], R | None], save: Callable[[str, R], None] | None = None,
               shared: Mapping[str, Any] | None = None, cpus: int = 1, description: str = "",
               done: Callable[[str, R], None] | None = None) -> dict[str, R]:
    """`{key: result}` for every piece of `items`, in the order of `items`.

    load(key): the recorded result, or None (then the piece runs on `executor`, None = local);
    save(key, result): records a computed result in the run; done(key, result): called for every
    piece, loaded or computed, when its result is there (a progress bar)."""
    results: dict[str, R] = {}
    missing: dict[str, Any] = {}
    for key, item in items.items():
        found = load(key)
        if found is None:
            missing[key] = item
            continue
        results[key] = found
        if done is not None:
            done(key, found)

    def record(key: str, result: R) -> None:
        if save is not None:
            save(key, result)
        results[key] = result
        if done is not None:
            done(key, result)

    run_missing(executor, fn, missing, record, shared=shared, cpus=cpus, description=description)
    return {key: results[key] for key in items}


class ThreadExecutor:
    """Pieces on `workers` threads of this process (one intra-op thread each), yielded as they
    complete; with one worker, one after another in the given order, torch's threads untouched."""

    name = "threads"

    def __init__(self, workers: int = 1) -> None:
        self.workers = max(1, workers)

    def map(self, fn: Callable[..., R], items: Mapping[str, Any], *,
            shared: Mapping[str, Any] | None = None, cpus: int = 1,  # noqa: ARG002
            description: str = "") -> Iterator[tuple[str, R]]:  # noqa: ARG002
        extra = dict(shared or {})
        if self.workers == 1 or len(items) <= 1:
            for key, item in items.items():
                yield key, fn(item, **extra)
            return
        with intra_op_threads(1), ThreadPoolExecutor(self.workers) as pool:
            futures = {pool.submit(fn, item, **extra): key for key, item in items.items()}
            for future in as_completed(futures):
                yield futures[future], future.result()

    def close(self) -> None:
        return None
