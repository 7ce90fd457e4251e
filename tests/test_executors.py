"""Executors: the Ray executor on a local cluster of two CPUs gives what the local one gives,
in the same order, and survives a worker that dies in the middle of an item."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from m3sb.errors import ConfigError
from m3sb.executors import (
    ExecutorError,
    LocalExecutor,
    RayExecutor,
    check_executor,
    check_ray_address,
    open_executor,
)

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """One local Ray cluster of two CPUs for the module (executors join it, never stop it)."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


class BrokenStart:
    """A problem whose workers cannot be built (as when a GPU runs out of memory)."""

    def build(self, device: str) -> Any:
        raise ConfigError("tasks[0].model: no such checkpoint")


class Squares:
    """A problem whose items are numbers; item ``dies_at`` kills its worker the first time."""

    def __init__(self, marks: Path | None = None, dies_at: int | None = None) -> None:
        self.marks, self.dies_at = marks, dies_at

    def build(self, device: str) -> Squares:
        return self

    def run(self, item: Any) -> Any:
        if item == "bad":
            raise ConfigError("item 'bad': not a number")
        if item == "fatal":
            os._exit(1)
        if self.marks is not None:
            (self.marks / f"ran-{item}-{time.monotonic_ns()}").touch()
            if item == self.dies_at and not (self.marks / "died").exists():
                (self.marks / "died").touch()
                os._exit(1)  # the worker process dies mid-item, as under the OOM killer
        time.sleep(0.05 * (item % 3))  # later items often finish first
        return item * item, os.getpid()


def test_ray_results_come_back_in_order_from_both_workers(cluster: None) -> None:
    items = list(range(12))
    with RayExecutor(Squares(), "cpu") as pool:
        assert pool.workers == 2
        results = list(pool.map(items))
    assert [square for square, _ in results] == [i * i for i in items]
    assert len({pid for _, pid in results}) == 2  # both actors worked
    with LocalExecutor(Squares(), "cpu") as local:
        assert [square for square, _ in local.map(items)] == [i * i for i in items]


def test_a_worker_that_dies_mid_item_is_restarted_and_nothing_is_lost_or_doubled(
    cluster: None, tmp_path: Path
) -> None:
    items = list(range(10))
    with RayExecutor(Squares(tmp_path, dies_at=4), "cpu") as pool:
        results = [square for square, _ in pool.map(items)]
    assert results == [i * i for i in items]
    assert (tmp_path / "died").exists()
    runs = [path.name.split("-")[1] for path in tmp_path.glob("ran-*")]
    assert sorted(runs, key=int) == sorted([str(i) for i in items] + ["4"], key=int)  # item 4 ran twice


def test_an_item_that_always_kills_its_worker_is_given_up_in_one_line(cluster: None) -> None:
    with RayExecutor(Squares(), "cpu") as pool:
        with pytest.raises(ExecutorError, match=r"^Ray workers died 4 times running item 1 \(") as caught:
            list(pool.map([1, "fatal", 2]))
        assert "\n" not in str(caught.value)
        assert [square for square, _ in pool.map([5, 6])] == [25, 36]  # the pool still works


def test_a_worker_that_cannot_start_is_one_line_at_once(cluster: None) -> None:
    with RayExecutor(BrokenStart(), "cpu") as pool, pytest.raises(ExecutorError) as caught:
        list(pool.map([1, 2]))
    message = str(caught.value)
    assert message.startswith("a Ray worker could not start: ")
    assert "tasks[0].model: no such checkpoint" in message and "\x1b" not in message and "\n" not in message


def test_a_worker_error_reaches_the_caller_as_the_same_one_line_error(cluster: None) -> None:
    with (
        RayExecutor(Squares(), "cpu") as pool,
        pytest.raises(ConfigError, match=r"^item 'bad': not a number$"),
    ):
        list(pool.map([1, "bad", 2]))


def test_workers_are_capped_and_a_gpu_is_refused_on_a_cluster_without_one(cluster: None) -> None:
    with RayExecutor(Squares(), "cpu", workers=1) as pool:
        assert pool.workers == 1
        assert [square for square, _ in pool.map([3, 4])] == [9, 16]
    with pytest.raises(ConfigError, match=r"--device cuda: the Ray cluster has no GPU"):
        RayExecutor(Squares(), "cuda")


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_an_unreachable_address_is_one_line_within_seconds() -> None:
    port = _closed_port()
    started = time.monotonic()
    with pytest.raises(ExecutorError, match=rf"--ray-address 127.0.0.1:{port}: cannot reach a Ray cluster"):
        check_ray_address(f"127.0.0.1:{port}")
    assert time.monotonic() - started < 10
    with pytest.raises(ConfigError, match="expected HOST:PORT"):
        check_ray_address("just-a-host")


def test_executor_names_and_address_are_checked() -> None:
    with pytest.raises(ConfigError, match="executor 'dask': choose one of local, ray"):
        check_executor("dask")
    with pytest.raises(ConfigError, match="--ray-address is only for --executor ray"):
        open_executor("local", "cpu", address="127.0.0.1:6379")
    with pytest.raises(ConfigError, match="--workers is only for --executor ray"):
        open_executor("local", "cpu", workers=2)
    for device in ("mps", "cuda:1", "gpu"):
        with pytest.raises(
            ConfigError, match=rf"--device {device}: with --executor ray choose auto, cpu or cuda"
        ):
            open_executor("ray", device)


# On real models: the digits zoo.


def _pareto_config(zoo_manifest: Path, **overrides: Any) -> Any:
    import json

    from m3sb.config import ParetoConfig

    zoo = json.loads(zoo_manifest.read_text())
    tasks = [
        {"name": t["name"], "model": t["checkpoint"], "dataset": {**t["dataset"], "max_samples": 80}}
        for t in zoo["tasks"][:3]
    ]
    base = zoo["base_model_checkpoint"]
    return ParetoConfig.model_validate({"base_model": base, "tasks": tasks, "budget": 12, **overrides})


def test_pareto_on_ray_writes_the_same_files_as_local(
    cluster: None, zoo_manifest: Path, tmp_path: Path
) -> None:
    """map's batches; bayesian's go through the same ``evaluate_many`` (one mode keeps CI short)."""
    from m3sb.pareto import SearchSettings
    from m3sb.pareto.run import run_pareto

    config = _pareto_config(zoo_manifest)
    quick = SearchSettings(generations=20)
    for kind in ("local", "ray"):
        run_pareto(config, tmp_path / kind, "map", [1.0, 2.0, 1.0], search=quick, executor=kind)
    for name in ("evaluations.csv", "front.csv", "selected.json"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name


def test_language_model_tasks_search_on_ray_as_locally(
    cluster: None, text_zoo_manifest: Path, tmp_path: Path
) -> None:
    from m3sb.config import ParetoConfig
    from m3sb.pareto import SearchSettings
    from m3sb.pareto.run import run_pareto

    zoo = json.loads(text_zoo_manifest.read_text())
    tasks = [
        {
            "name": t["name"],
            "model": t["checkpoint"],
            "kind": "causal_lm",
            "dataset": {
                "dataset_name": t["dataset"]["dataset_name"],
                "format": "exact_match",
                "max_samples": 60,
            },
        }
        for t in zoo["tasks"]
        if t["name"] in ("reverse", "sort")
    ]
    config = ParetoConfig.model_validate(
        {"base_model": zoo["base_model_checkpoint"], "tasks": tasks, "budget": 8}
    )
    for kind in ("local", "ray"):
        run_pareto(
            config, tmp_path / kind, baselines=False, search=SearchSettings(generations=10), executor=kind
        )
    for name in ("evaluations.csv", "front.csv"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name


class DiesOnce:
    """A real problem whose worker dies (the process exits) once, on the third item run or the
    first after it."""

    def __init__(self, problem: Any, marks: Path) -> None:
        self.problem, self.marks = problem, marks

    def build(self, device: str) -> DiesOnce:
        self.worker = self.problem.build(device)
        return self

    def run(self, item: Any) -> Any:
        (self.marks / f"ran-{time.monotonic_ns()}").touch()
        if len(list(self.marks.glob("ran-*"))) >= 3:  # two workers may both pass the third item
            try:  # exactly one worker creates the mark, and only that one dies
                os.close(os.open(self.marks / "died", os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return self.worker.run(item)
            os._exit(1)
        return self.worker.run(item)


def test_a_search_whose_worker_dies_finishes_with_the_same_evaluations(
    cluster: None, zoo_manifest: Path, tmp_path: Path
) -> None:
    import numpy as np

    from m3sb.pareto import SearchSettings, amortized_pareto_front
    from m3sb.pareto.run import PoolEvaluator, load_problem

    problem = load_problem(_pareto_config(zoo_manifest), lambda _: None)
    quick = SearchSettings(generations=20)

    def search(pool: Any) -> Any:
        evaluator = PoolEvaluator(pool, problem)
        return amortized_pareto_front(evaluator, 3, 12, search=quick, evaluate_many=evaluator.evaluate_many)

    with LocalExecutor(problem, "cpu") as local:
        expected = search(local)
    with RayExecutor(DiesOnce(problem.for_workers(), tmp_path), "cpu") as pool:
        survived = search(pool)
    assert (tmp_path / "died").exists()
    assert len(list(tmp_path.glob("ran-*"))) == 12 + 1  # one item ran twice; every result was kept once
    assert len(survived.evaluated) == len(expected.evaluated) == 12
    for ours, theirs in zip(survived.evaluated, expected.evaluated, strict=True):
        np.testing.assert_array_equal(ours.coefficients, theirs.coefficients)
        np.testing.assert_array_equal(ours.metrics, theirs.metrics)
    np.testing.assert_array_equal(survived.coefficients, expected.coefficients)


def test_experiment_on_ray_gives_the_local_table(cluster: None, zoo_manifest: Path) -> None:
    import json

    import pandas as pd

    from m3sb.experiment import TaskVectorExperiment

    zoo = json.loads(zoo_manifest.read_text())
    tasks = zoo["tasks"][:3]
    experiment = TaskVectorExperiment(
        "ray",
        [t["checkpoint"] for t in tasks],
        [{**t["dataset"], "max_samples": 60} for t in tasks],
        {"task_arithmetic": {"weights": [0.3] * 3}, "ties": {"density": 0.3}, "barycenter": {}},
        zoo["base_model_checkpoint"],
    )
    local = experiment.run()
    local_points = {label: point.clone() for label, point in experiment.points.items()}
    remote = experiment.run(executor="ray")
    pd.testing.assert_frame_equal(remote, local)
    assert experiment.points.keys() == local_points.keys()
    for label, point in local_points.items():
        assert bool((experiment.points[label] == point).all()), label


def test_cli_names_an_unreachable_cluster_in_one_line(zoo_manifest: Path, tmp_path: Path) -> None:
    import subprocess

    import yaml

    config = tmp_path / "pareto.yaml"
    config.write_text(yaml.safe_dump(_pareto_config(zoo_manifest).model_dump()))
    port = _closed_port()
    command = [
        sys.executable,
        "-m",
        "m3sb.cli",
        "pareto",
        str(config),
        "--results-path",
        str(tmp_path / "out"),
    ]
    done = subprocess.run(
        [*command, "--executor", "ray", "--ray-address", f"127.0.0.1:{port}"], capture_output=True, text=True
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: --ray-address 127.0.0.1:{port}: cannot reach a Ray cluster there (Connection refused)"
    ]
    assert not (tmp_path / "out").exists()
