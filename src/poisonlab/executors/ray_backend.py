"""The `ray` executor: every piece a Ray task, the shared inputs in the object store once.

`RayExecutor()` starts a Ray instance on this machine sized for it (`num_cpus` cores, default all;
no dashboard; an object store of at most 1 GiB or a tenth of the memory; the loopback address;
no usage statistics; workers' output not copied to this terminal) and shuts it down on `close()`,
on leaving its `with` block or at interpreter exit. `RayExecutor(address=...)` joins a running
cluster (`host:port` of its head, `ray://host:port` for Ray Client, or `auto`) and on close only
disconnects: the cluster stays up. A head that cannot be reached is a one-line ConfigError after a
bounded wait. When this process is already connected to Ray (a test session's instance), the
executor uses that connection and leaves it open.

`map(fn, items, shared=..., cpus=c)`: each value of `shared` is put into the object store once per
call and every task receives the same reference (Ray hands a worker the stored object, it is not
sent again per piece); each item is one task reserving `c` CPUs, whose torch runs `c` intra-op
threads; results are yielded in completion order (`ray.wait`). A task whose worker process dies
(killed, out of memory) is re-run by Ray up to `max_retries` times, so a lost worker costs only
its piece (lost more often: a one-line RunError naming it); an exception raised by `fn` is not
retried. A poisonlab error raised in a piece is
raised again on the driver as itself (not wrapped), so the CLI prints its one line. Leaving the
iteration early cancels the pieces not yet finished.

`start_actors(cls, inits, shared=..., cpus=c)`: one Ray actor per init, each reserving `c` CPUs
for its whole life and running `c` torch threads; the values of `shared` are put into the object
store once and every actor builds `cls(**init, **shared)` from the same references. In
`Actors.call(method, per_actor, **common)` each `common` value is put once per call and handed to
every actor by reference (the poisons of a craft step, sent once, not once per actor); the
`per_actor` arguments travel with their actor's call. An actor is not restarted: its state (the
weights it trained) would be lost, so a dead actor (killed, out of memory) is a one-line RunError
naming it and the method. A poisonlab error raised by the constructor or a method is raised on
the driver as itself. On the local instance, actors that need more CPUs in all than it has are a
ConfigError (they would wait for ever); on a cluster they wait for free CPUs.

The cluster's workers must be able to import poisonlab (and `fn`'s module): installed there, or
on the PYTHONPATH the local instance inherits from this process.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from poisonlab.errors import ConfigError, PoisonlabError, RunError
from poisonlab.executors.actors import per_actor_arguments
from poisonlab.progress import progress_bar

R = TypeVar("R")
GiB = 1 << 30
CONNECT_TIMEOUT = 5.0  # seconds to wait for a cluster's head before giving up


# A local Ray instance's CPUs are a logical count: more than the cores queue pieces on them (and
# a count Ray cannot start a node for failed after half a minute, as an internal error).
OVERSUBSCRIBE = 16


def max_local_cpus() -> int:
    """The largest --ray-cpus of a local Ray instance on this machine."""
    return OVERSUBSCRIBE * (os.cpu_count() or 1)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--backend ray needs Ray: pip install poisonlab[ray]") from None
    return ray


def object_store_bytes() -> int:
    """The local instance's object store: 1 GiB or a tenth of the physical memory, the smaller."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return GiB
    return max(100 << 20, min(GiB, memory // 10))


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """ConfigError unless a TCP connection to `address` (host:port, optionally ray://) opens
    within `timeout` seconds; `auto` and addresses without a port are left to Ray."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdecimal():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"cannot reach a Ray cluster at --ray-address {address}: "
                          f"{reason}") from None


def _run_piece(fn: Callable[..., R], item: Any, cpus: int, names: tuple[str, ...],
               *values: Any) -> R:
    """Body of every task: the task's CPUs as torch threads, then the piece."""
    import torch

    torch.set_num_threads(max(1, cpus))
    return fn(item, **dict(zip(names, values, strict=True)))


class _Host:
    """Body of every actor: the actor's CPUs as torch threads, the object built by `build` (a
    method, not the constructor, so that its errors come back like a task's), then its calls."""

    def __init__(self, cpus: int) -> None:
        import torch

        torch.set_num_threads(max(1, cpus))
        self.obj: Any = None

    def build(self, cls: type, init: Mapping[str, Any], names: tuple[str, ...],
              *values: Any) -> None:
        self.obj = cls(**init, **dict(zip(names, values, strict=True)))

    def call(self, method: str, own: Mapping[str, Any], names: tuple[str, ...],
             *values: Any) -> Any:
        return getattr(self.obj, method)(**own, **dict(zip(names, values, strict=True)))


def _raise_cause(exc: Exception) -> None:
    """A poisonlab error inside a task or actor, raised as itself (not wrapped)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, PoisonlabError):
        raise cause from None


class RayActors:
    """Ray actors started by `RayExecutor.start_actors`; see the module docstring."""

    def __init__(self, ray: Any, cls: type, inits: Sequence[Mapping[str, Any]],
                 shared: Mapping[str, Any] | None, cpus: int) -> None:
        self._ray, self.name = ray, cls.__name__
        host = ray.remote(_Host).options(num_cpus=cpus, max_restarts=0, max_task_retries=0)
        names = tuple(shared or {})
        refs = [ray.put(shared[k]) for k in names] if shared else []  # once for all actors
        self._actors = [host.remote(cpus) for _ in inits]
        try:
            self._gather("the constructor", [a.build.remote(cls, dict(init), names, *refs)
                                             for a, init in zip(self._actors, inits, strict=True)])
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return len(self._actors)

    def call(self, method: str, per_actor: Sequence[Mapping[str, Any]] | None = None,
             **common: Any) -> list[Any]:
        args = per_actor_arguments(per_actor, len(self._actors))
        names = tuple(common)
        refs = [self._ray.put(common[k]) for k in names]  # once per call, shared by all actors
        return self._gather(method, [a.call.remote(method, own, names, *refs)
                                     for a, own in zip(self._actors, args, strict=True)])

    def _gather(self, method: str, refs: list[Any]) -> list[Any]:
        errors = self._ray.exceptions
        out = []
        for i, ref in enumerate(refs):
            try:
                out.append(self._ray.get(ref))
            except errors.RayTaskError as exc:  # raised by the object itself
                _raise_cause(exc)
                raise
            except errors.RayError as exc:  # its process died
                raise RunError(f"actor {i} of {len(refs)} ({self.name}) was lost "
                               f"({type(exc).__name__}) in {method}; actors are not "
                               "restarted (their state would be lost)") from None
        return out

    def close(self) -> None:
        """Kill the actors (idempotent); their CPUs return to the instance."""
        actors, self._actors = self._actors, []
        for actor in actors:
            self._ray.kill(actor)

    def __enter__(self) -> RayActors:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _not_token_auth_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled")


class RayExecutor:
    """Pieces as Ray tasks; see the module docstring."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None, *,
                 max_retries: int = 3) -> None:
        if num_cpus is not None and not 1 <= num_cpus <= max_local_cpus():
            raise ConfigError(f"--ray-cpus must be between 1 and {max_local_cpus()} (a local "
                              f"Ray instance of at most {OVERSUBSCRIBE}× this machine's "
                              f"{os.cpu_count() or 1} cores), got {num_cpus}")
        self._ray = _import_ray()
        self.address, self.max_retries = address, max_retries
        self._owned = False  # this executor called ray.init (and so calls ray.shutdown)
        if address is not None:
            check_reachable(address)
        if not self._ray.is_initialized():
            self._connect(address, num_cpus)
            self._owned = True
            atexit.register(self.close)
        self._remote = self._ray.remote(_run_piece)

    def _connect(self, address: str | None, num_cpus: int | None) -> None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        quiet = {"log_to_driver": False, "logging_level": logging.WARNING,
                 "include_dashboard": False}
        # Ray enables token authentication (for a new local cluster, or when a token is on
        # disk) and says so in a WARNING line on stderr: the choice stays Ray's, the line goes.
        logging.getLogger("ray._private.authentication.authentication_token_setup"
                          ).addFilter(_not_token_auth_notice)
        try:
            if address is None:
                self._ray.init(num_cpus=num_cpus or os.cpu_count() or 1,
                               object_store_memory=object_store_bytes(),
                               _node_ip_address="127.0.0.1", **quiet)
            else:
                quiet.pop("include_dashboard")
                self._ray.init(address=address, **quiet)
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for a node that
            # did not start, besides ConnectionError, TimeoutError, RuntimeError and ValueError
            where = f"at --ray-address {address}" if address else "on this machine"
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"cannot start or join a Ray cluster {where}: {first}") from None

    def map(self, fn: Callable[..., R], items: Mapping[str, Any], *,
            shared: Mapping[str, Any] | None = None, cpus: int = 1,
            description: str = "") -> Iterator[tuple[str, R]]:
        """See poisonlab.executors.Executor.map; a progress bar when `description` is given."""
        if not items:
            return
        ray = self._ray
        if self.address is None and ray.cluster_resources().get("CPU", 0) < cpus:
            raise ConfigError(f"a piece needs {cpus} CPUs, the local Ray instance has "
                              f"{ray.cluster_resources().get('CPU', 0):g} (--ray-cpus)")
        names = tuple(shared or {})
        refs = [ray.put(shared[k]) for k in names] if shared else []  # once per call
        task = self._remote.options(num_cpus=cpus, max_retries=self.max_retries,
                                    retry_exceptions=False)
        pending = {task.remote(fn, item, cpus, names, *refs): key for key, item in items.items()}
        try:
            with progress_bar(len(pending), description, enabled=bool(description)) as bar:
                while pending:
                    (ready,), _ = ray.wait(list(pending), num_returns=1)
                    key = pending.pop(ready)
                    yield key, self._result(ready, key)
                    bar.advance(status=key)
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)

    def start_actors(self, cls: type, inits: Sequence[Mapping[str, Any]], *,
                     shared: Mapping[str, Any] | None = None, cpus: int = 1) -> RayActors:
        """See poisonlab.executors.Executor.start_actors and the module docstring."""
        have = self._ray.cluster_resources().get("CPU", 0)
        if self.address is None and have < cpus * len(inits):
            raise ConfigError(f"{len(inits)} actors of {cpus} CPUs need {cpus * len(inits)}, "
                              f"the local Ray instance has {have:g} (--ray-cpus)")
        return RayActors(self._ray, cls, inits, shared, cpus)

    def _result(self, ref: Any, key: str) -> Any:
        errors = self._ray.exceptions
        try:
            return self._ray.get(ref)
        except errors.RayTaskError as exc:  # raised by the piece itself
            _raise_cause(exc)
            raise
        except errors.RayError as exc:  # its worker or node died more often than retried
            raise RunError(f"piece {key}: its Ray worker was lost ({type(exc).__name__}) on "
                           f"each of {self.max_retries + 1} attempt(s); the pieces recorded so "
                           "far are kept") from None

    def close(self) -> None:
        """Shut down the instance this executor started, or disconnect from the cluster it
        joined; a connection it found already open stays open."""
        if self._owned:
            self._owned = False
            atexit.unregister(self.close)
            self._ray.shutdown()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
