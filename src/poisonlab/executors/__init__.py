"""Where independent pieces of an experiment run: in this process (`local`) or on Ray (`ray`).

A piece is one seeded, independent unit of work whose result the driver records as soon as it
arrives (a shadow model's weights, a victim's predictions, a sweep point's metrics): the caller
hands `Executor.map` a function, the pieces' inputs keyed by name, and the large inputs every
piece shares; `map` yields `(key, result)` pairs as the pieces complete, in any order. The
function must be importable at module level (Ray pickles it by reference) and must seed itself
from its inputs alone, so that a piece's result does not depend on where, when or after which
other pieces it ran: that is what makes `local` and `ray` give the same numbers.

An actor is a long-lived worker that keeps its own state between calls (a slice of MetaPoison's
surrogate ensemble: weights that train a little every craft step). `Executor.start_actors(cls,
inits, shared=...)` builds one `cls(**init, **shared)` per init and returns an `Actors` handle;
`Actors.call(method, per_actor, **common)` calls `method(**per_actor[i], **common)` on every
actor i and returns the results in actor order; `Actors.close()` ends them. `common` holds what
every actor receives in this call (the current poisons), `per_actor` what differs between them.
The methods must not modify their arguments: in this process all actors get the same objects.

`local` (the default) runs the pieces one after the other in this process, in the given order,
exactly as the code would without an executor, and its actors are plain objects here, called
one after the other. `ray` (the optional extra `poisonlab[ray]`) runs pieces as Ray tasks and
actors as Ray actors: poisonlab.executors.ray_backend. The core imports and works without Ray.

This layer sits just above the ground floor: it imports nothing of poisonlab but the ground
modules, so evaluation/ can take an executor without importing anything above itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, Protocol, TypeVar

from poisonlab.errors import ConfigError
from poisonlab.executors.actors import Actors, LocalActors

__all__ = ["BACKENDS", "Actors", "Backend", "Executor", "LocalActors", "LocalExecutor",
           "get_executor", "run_missing"]

R = TypeVar("R")
Backend = Literal["local", "ray"]
BACKENDS: tuple[str, ...] = ("local", "ray")


class Executor(Protocol):
    """Runs pieces and actors; see the module docstring."""

    name: str

    def map(self, fn: Callable[..., R], items: Mapping[str, Any], *,
            shared: Mapping[str, Any] | None = None, cpus: int = 1,
            description: str = "") -> Iterator[tuple[str, R]]:
        """Call `fn(item, **shared)` for every `key: item`; yield `(key, result)` as each
        completes. `cpus`: the CPU cores one piece uses (its torch threads on Ray)."""
        ...

    def start_actors(self, cls: type, inits: Sequence[Mapping[str, Any]], *,
                     shared: Mapping[str, Any] | None = None, cpus: int = 1) -> Actors:
        """One actor `cls(**init, **shared)` per init, in that order; `cpus`: the CPU cores
        each actor holds while it lives (its torch threads on Ray)."""
        ...

    def close(self) -> None:
        """Release what the executor holds (a Ray instance it started)."""
        ...


class LocalExecutor:
    """The pieces one after another in this process, in the order given."""

    name = "local"

    def map(self, fn: Callable[..., R], items: Mapping[str, Any], *,
            shared: Mapping[str, Any] | None = None, cpus: int = 1,  # noqa: ARG002
            description: str = "") -> Iterator[tuple[str, R]]:  # noqa: ARG002
        extra = dict(shared or {})
        for key, item in items.items():
            yield key, fn(item, **extra)

    def start_actors(self, cls: type, inits: Sequence[Mapping[str, Any]], *,
                     shared: Mapping[str, Any] | None = None,
                     cpus: int = 1) -> LocalActors:  # noqa: ARG002
        return LocalActors([cls(**init, **dict(shared or {})) for init in inits])

    def close(self) -> None:
        return None

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def get_executor(backend: str = "local", *, address: str | None = None,
                 num_cpus: int | None = None) -> Executor:
    """The executor named `backend`; `address` and `num_cpus` are Ray's (see ray_backend)."""
    if backend == "local":
        if address is not None:
            raise ConfigError("--ray-address needs --backend ray")
        return LocalExecutor()
    if backend == "ray":
        from poisonlab.executors.ray_backend import RayExecutor  # optional extra

        return RayExecutor(address=address, num_cpus=num_cpus)
    raise ConfigError(f"unknown backend '{backend}': choose one of {', '.join(BACKENDS)}")


def run_missing(executor: Executor | None, fn: Callable[..., R], items: Mapping[str, Any],
                record: Callable[[str, R], None], *, shared: Mapping[str, Any] | None = None,
                cpus: int = 1, description: str = "") -> None:
    """Run the pieces in `items` on `executor` (None: local) and `record(key, result)` each one
    as it arrives; the caller leaves out of `items` the pieces it has already recorded."""
    if not items:
        return
    for key, result in (executor or LocalExecutor()).map(
            fn, items, shared=shared, cpus=cpus, description=description):
        record(key, result)
