"""Actors: long-lived workers with state, started by an executor (poisonlab.executors).

`Actors` is what `Executor.start_actors` returns; `LocalActors` the local executor's (plain
objects of this process). Its own module so that the Ray backend can share `per_actor_arguments`
without importing the package that imports it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol


class Actors(Protocol):
    """Live actors started by `Executor.start_actors`; see the module docstring."""

    def __len__(self) -> int:
        """The number of actors."""
        ...

    def call(self, method: str, per_actor: Sequence[Mapping[str, Any]] | None = None,
             **common: Any) -> list[Any]:
        """`method(**per_actor[i], **common)` on every actor i (per_actor None: no per-actor
        arguments); the results in actor order."""
        ...

    def close(self) -> None:
        """End the actors (their state is lost); calling it again does nothing."""
        ...


def per_actor_arguments(per_actor: Sequence[Mapping[str, Any]] | None,
                        actors: int) -> list[dict[str, Any]]:
    """`per_actor` as one dict per actor (None: empty ones); ValueError if the count is wrong."""
    if per_actor is None:
        return [{} for _ in range(actors)]
    if len(per_actor) != actors:
        raise ValueError(f"per_actor has {len(per_actor)} entries for {actors} actors")
    return [dict(args) for args in per_actor]


class LocalActors:
    """Actors as plain objects of this process, called one after another in actor order."""

    def __init__(self, objects: list[Any]) -> None:
        self._objects = objects

    def __len__(self) -> int:
        return len(self._objects)

    def call(self, method: str, per_actor: Sequence[Mapping[str, Any]] | None = None,
             **common: Any) -> list[Any]:
        args = per_actor_arguments(per_actor, len(self._objects))
        return [getattr(obj, method)(**own, **common)
                for obj, own in zip(self._objects, args, strict=True)]

    def close(self) -> None:
        self._objects = []

    def __enter__(self) -> LocalActors:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


