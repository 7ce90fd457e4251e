"""Where evaluations run: in this process (``local``) or on Ray actors (``ray``).

An executor is given a *problem* once: a picklable object whose ``build(device)``
returns a *worker* with ``run(item) -> result``. ``map(items)`` then yields the
results in the order of ``items``, whatever order the workers finish in, so a
search that consumes them takes the same decisions with either executor.

The Ray executor puts the problem in the object store once (its numpy arrays are
shared zero-copy by the actors of a node), starts one actor per GPU, or per CPU slot
when the device is the CPU, and hands items to actors as they free up. An actor that
dies is replaced by a new one (on any node with room) and its unfinished item is run
there again; each item's result is taken exactly once. This is the only module that imports ray.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator, Sequence
from typing import Any, Literal, Protocol

from m3sb.errors import ConfigError, M3SBError

ExecutorKind = Literal["local", "ray"]
EXECUTORS: tuple[ExecutorKind, ...] = ("local", "ray")
ACTOR_RESTARTS = 3  # how many times an item whose actor died is run again, on a new actor
CONNECT_TIMEOUT_S = 5.0


class Worker(Protocol):
    """Evaluates items, one at a time."""

    def run(self, item: Any) -> Any:
        """The result for one item."""


class Problem(Protocol):
    """What every worker needs (models, data, settings): picklable and device-free."""

    def build(self, device: str) -> Worker:
        """A worker computing on ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``)."""


class ExecutorError(M3SBError):
    """An executor cannot start, or lost its workers beyond recovery."""


def check_executor(kind: str, address: str | None = None) -> ExecutorKind:
    """``kind`` if it names an executor (and ``address``, if any, is reachable and for Ray);
    a one-line error otherwise. Run it before loading anything."""
    if kind not in EXECUTORS:
        raise ConfigError(f"executor '{kind}': choose one of {', '.join(EXECUTORS)}")
    if address and kind == "local":
        raise ConfigError("--ray-address is only for --executor ray")
    if address:
        check_ray_address(address)
    return kind


class LocalExecutor:
    """Runs every item in this process, in order, with one worker."""

    def __init__(self, problem: Problem | None, device: str) -> None:
        from m3sb.devices import resolve_device

        resolve_device(device)  # a device that is not there is an error before anything loads
        self.device = device
        self.workers = 1
        if problem is not None:
            self.start(problem)

    def start(self, problem: Problem) -> None:
        """Build the worker for ``problem``."""
        self.worker = problem.build(self.device)

    def map(self, items: Sequence[Any]) -> Iterator[Any]:
        """The results of ``items``, in order, each as soon as it is computed."""
        for item in items:
            yield self.worker.run(item)

    def close(self) -> None:
        """Nothing to release."""

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def check_ray_address(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """A clear error, within ``timeout`` seconds, when nothing listens at ``address``.

    (``ray.init`` itself retries an unreachable address for minutes.)
    """
    if address == "auto":
        return
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--ray-address {address}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ExecutorError(f"--ray-address {address}: cannot reach a Ray cluster there ({reason})") from None


def check_ray_device(device: str) -> None:
    """Devices a Ray worker can be given: ``auto``, ``cpu`` or ``cuda`` (each GPU worker has one)."""
    if device not in ("auto", "cpu", "cuda"):
        hint = (
            "; with --executor ray every GPU worker has its own, so use --device cuda"
            if device.startswith("cuda:")
            else ""
        )
        raise ConfigError(f"--device {device}: with --executor ray choose auto, cpu or cuda{hint}")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _last_error_line(error: BaseException) -> str:
    """The last line of a Ray error's traceback text (where the worker's own error is), plain."""
    lines = [line.strip() for line in _ANSI.sub("", str(error)).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _ray() -> Any:
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")  # workers use this environment as it is
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "executor 'ray' needs Ray: install the extra with `pip install 'm3sb[ray]'`"
        ) from None
    return ray


class _RayWorker:
    """The actor: builds a worker from the shared problem once, then runs items."""

    def __init__(self, problem: Problem, device: str, threads: int) -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.worker = problem.build(device)

    def run(self, item: Any) -> Any:
        return self.worker.run(item)


class RayExecutor:
    """Runs items on Ray actors: one per GPU, or one per CPU slot (``workers`` to cap them).

    Without ``address`` (and without ``RAY_ADDRESS``) a local cluster of ``num_cpus`` CPUs
    (all of this machine's by default) is started and shut down by :meth:`close`; with
    one, the executor joins that cluster and leaves it running. Connecting and checking
    the device come first; :meth:`start` (or a ``problem`` given here) starts the actors.
    """

    def __init__(
        self,
        problem: Problem | None,
        device: str,
        address: str | None = None,
        workers: int | None = None,
        num_cpus: int | None = None,
    ) -> None:
        check_ray_device(device)
        ray = _ray()
        self._ray = ray
        self._actors: list[Any] = []
        address = address or os.environ.get("RAY_ADDRESS") or None
        self._started = False
        if not ray.is_initialized():
            if address is not None:
                check_ray_address(address)  # ray.init retries an unreachable address for minutes
            try:
                ray.init(
                    address=address,
                    num_cpus=num_cpus if address is None else None,
                    include_dashboard=False,
                    logging_level="ERROR",
                    log_to_driver=False,
                )
            except ConnectionError:
                raise ExecutorError(f"--ray-address {address}: no running Ray cluster found there") from None
            self._started = address is None
        try:
            self._plan_actors(device, workers)
            if problem is not None:
                self.start(problem)
        except BaseException:
            self.close()
            raise

    def _plan_actors(self, device: str, workers: int | None) -> None:
        """How many actors, with which resources: refuses a GPU the cluster does not have."""
        resources = self._ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        if device == "cuda" and gpus == 0:
            raise ConfigError(f"--device {device}: the Ray cluster has no GPU")
        use_gpus = gpus > 0 and device != "cpu"
        slots = gpus if use_gpus else max(1, cpus)
        self.workers = min(workers, slots) if workers else slots
        self._options = {
            "num_gpus": 1 if use_gpus else 0,
            "num_cpus": 0 if use_gpus else 1,
            "max_restarts": 0,
        }
        # Inside an actor its one GPU is cuda:0; a CPU actor computes with one thread.
        self._device, self._threads = ("cuda", 0) if use_gpus else ("cpu", 1)

    def start(self, problem: Problem) -> None:
        """Put ``problem`` in the object store once and start the actors on it."""
        ray = self._ray
        self._remote = ray.remote(_RayWorker).options(**self._options)
        self._actor_args = (ray.put(problem), self._device, self._threads)
        self._actors = [self._new_actor() for _ in range(self.workers)]

    def _new_actor(self) -> Any:
        return self._remote.remote(*self._actor_args)

    def map(self, items: Sequence[Any]) -> Iterator[Any]:
        """The results of ``items``, in order; items go to actors as they free up.

        An actor that dies takes no result with it: a new actor replaces it and the item
        it held is run again, up to ``ACTOR_RESTARTS`` times per item.
        """
        ray = self._ray
        queue = list(enumerate(items))[::-1]
        idle = list(self._actors)
        running: dict[Any, tuple[int, Any, Any]] = {}
        finished: dict[int, Any] = {}
        retries = [0] * len(items)
        following = 0
        while following < len(items):
            while queue and idle:
                index, item = queue.pop()
                actor = idle.pop()
                running[actor.run.remote(item)] = (index, item, actor)
            if following in finished:
                yield finished.pop(following)
                following += 1
                continue
            done, _ = ray.wait(list(running), num_returns=1)
            index, item, actor = running.pop(done[0])
            try:
                finished[index] = self._result(done[0])
                idle.append(actor)
            except ray.exceptions.RayActorError as error:
                if getattr(error, "actor_init_failed", False):
                    raise ExecutorError(f"a Ray worker could not start: {_last_error_line(error)}") from None
                retries[index] += 1
                if retries[index] > ACTOR_RESTARTS:
                    raise ExecutorError(
                        f"Ray workers died {retries[index]} times running item {index} "
                        f"({str(error).splitlines()[0]})"
                    ) from None
                replacement = self._new_actor()
                self._actors[self._actors.index(actor)] = replacement
                queue.append((index, item))
                idle.append(replacement)

    def _result(self, reference: Any) -> Any:
        """The value behind ``reference``; the worker's own error when it raised one."""
        ray = self._ray
        try:
            return ray.get(reference)
        except ray.exceptions.RayTaskError as error:
            cause = error.cause if isinstance(error.cause, BaseException) else None
            if cause is not None:
                raise cause from None
            raise ExecutorError(f"a Ray worker failed: {str(error).splitlines()[0]}") from None

    def close(self) -> None:
        """Stop the actors; shut down the cluster if this executor started it."""
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors = []
        if self._started:
            self._ray.shutdown()
            self._started = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


Executor = LocalExecutor | RayExecutor


def open_executor(
    kind: str,
    device: str = "cpu",
    address: str | None = None,
    workers: int | None = None,
) -> Executor:
    """An executor of ``kind``, connected and with its device checked, before anything is
    loaded: call its ``start(problem)`` next (and use it as a context manager)."""
    if check_executor(kind, address) == "local":
        if workers is not None:
            raise ConfigError("--workers is only for --executor ray")
        return LocalExecutor(None, device)
    return RayExecutor(None, device, address, workers)
