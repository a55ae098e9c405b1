"""Evaluation over Ray actors on a local cluster this test starts itself (a head without CPUs and two
worker nodes of one CPU each, so each actor lands on its own node), then tears down. Tiny models
keep it fast; the records are compared with a single-process run of the same inputs."""

from __future__ import annotations

import os
import signal
from dataclasses import asdict

import pytest

from residlab.data import load_problems
from residlab.engines import EngineSpec
from residlab.evaluation.report import summarize
from residlab.evaluation.runner import Condition, Decoding, evaluate, records_path
from residlab.testing import save_tiny_model

ray = pytest.importorskip("ray")

DETERMINISTIC = ("id", "condition", "output", "tokens", "hit_limit", "extracted", "rule", "gold", "correct")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ray.cluster_utils import Cluster

    small = 80 * 1024 * 1024
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": small})
    try:
        for _ in range(2):
            nodes.add_node(num_cpus=1, object_store_memory=small)
        ray.init(address=nodes.address, log_to_driver=False, include_dashboard=False)
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def _spec(model_dir) -> EngineSpec:
    return EngineSpec(str(model_dir), engine="torch", dtype="float32", device="cpu")


def _deterministic(records):
    return [{k: asdict(r)[k] for k in DETERMINISTIC} for r in records]


def _pool(model_dir):
    from residlab.distributed.ray_pool import ActorPool, RayOptions

    return ActorPool(_spec(model_dir), RayOptions(address="auto", actors=2, max_restarts=2))


def _evaluator(pool, **kwargs):
    from residlab.distributed.ray_eval import RayEvaluator

    return RayEvaluator(pool, progress=False, **kwargs)


CONDITION = Condition("baseline", "Q: {question}\nA:")
DECODING = Decoding(max_new_tokens=12, batch_size=2)


def test_records_equal_a_single_process_run_and_resume_it(cluster, model_dir, tmp_path):
    problems = load_problems("synthetic", "test", limit=10)
    local = _spec(model_dir).open()
    single = evaluate(local, problems, CONDITION, DECODING, tmp_path / "single", progress=False)
    with _pool(model_dir) as pool:
        assert len(set(pool.actor_pids)) == 2
        evaluator = _evaluator(pool)
        half = evaluator(None, problems[:5], CONDITION, DECODING, tmp_path / "ray")
        spread = evaluator(None, problems, CONDITION, DECODING, tmp_path / "ray")  # resumes the first 5
    assert _deterministic(spread) == _deterministic(single)
    assert _deterministic(half) == _deterministic(single[:5])
    summary, reference = asdict(summarize("baseline", spread)), asdict(summarize("baseline", single))
    for key in ("n", "accuracy", "accuracy_ci95", "mean_tokens", "median_tokens", "cut_off_share", "extraction_rules"):
        assert summary[key] == reference[key]
    # the same records file a single-process run writes, one line per problem
    path = records_path(tmp_path / "ray", CONDITION, DECODING, local)
    assert path.name == records_path(tmp_path / "single", CONDITION, DECODING, local).name
    assert len(path.read_text().splitlines()) == len(problems)
    # and a single-process run continues it without redoing anything
    again = evaluate(local, problems, CONDITION, DECODING, tmp_path / "ray", progress=False)
    assert [r.time for r in again] == [r.time for r in spread]


def test_an_actor_killed_mid_run_loses_no_record_and_duplicates_none(cluster, model_dir, tmp_path):
    problems = load_problems("synthetic", "test", limit=12)
    killed: list[int] = []

    def kill_every_actor_once(pool, stored_batches):
        if not killed:  # one actor is mid-batch now: that batch is lost and must be redone elsewhere
            for pid in pool.actor_pids:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    with _pool(model_dir) as pool:
        evaluator = _evaluator(pool, on_batch=kill_every_actor_once)
        records = evaluator(None, problems, CONDITION, DECODING, tmp_path / "ray")
        assert killed and pool.lost_tasks >= 1
        assert set(pool.actor_pids).isdisjoint(killed)  # Ray restarted them, and they worked again
    single = evaluate(_spec(model_dir).open(), problems, CONDITION, DECODING, tmp_path / "single", progress=False)
    assert _deterministic(records) == _deterministic(single)
    path = records_path(tmp_path / "ray", CONDITION, DECODING, _spec(model_dir).open())
    ids = [line.split('"id": ')[1].split(",")[0] for line in path.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == len(problems)


def test_eval_command_with_ray_prints_the_single_process_table(cluster, model_dir, tmp_path):
    from typer.testing import CliRunner

    from residlab.cli.main import app

    common = ["eval", "--model", str(model_dir), "--dataset", "synthetic", "--limit", "6", "--max-new-tokens", "8",
              "--batch-size", "2", "--dtype", "float32", "--engine", "torch", "--device", "cpu"]  # fmt: skip
    plain = CliRunner().invoke(app, [*common, "--work-dir", str(tmp_path / "a")])
    spread = CliRunner().invoke(app, [*common, "--work-dir", str(tmp_path / "b"), "--ray", "auto", "--ray-actors", "2"])
    assert plain.exit_code == 0 and spread.exit_code == 0, plain.output + spread.output

    def table(output: str) -> list[str]:  # the markdown table without the timing column
        rows = [line for line in output.splitlines() if line.startswith("|")]
        return [line.rsplit("|", 3)[0] for line in rows]

    assert table(spread.stdout) == table(plain.stdout) and len(table(plain.stdout)) >= 3
    assert "on Ray at auto" in spread.output


DOCUMENTS = [
    "The river rose slowly through the night, and by morning the fields were under water.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "Weng earns twelve dollars an hour for babysitting; yesterday she did fifty minutes of it.",
    "Farmers moved their animals to higher ground while the town council met about the old bridge.",
] * 3


def _harvest(lm, root, max_tokens, runner=None):
    from residlab.saes.activations import HarvestSpec, harvest

    spec = HarvestSpec(lm.name, 1, "block", "test", "docs-v1", "train", context_len=12)
    return harvest(lm, DOCUMENTS, spec, root, max_tokens=max_tokens, batch_size=2, shard_tokens=40,
                   progress=False, runner=runner)  # fmt: skip


def test_harvest_over_ray_writes_the_single_process_shards(cluster, model_dir, tmp_path):
    from safetensors.torch import load_file

    from residlab.distributed.ray_harvest import ray_chunks

    lm = _spec(model_dir).open().lm
    # a partial harvest, then resumed (a resumed store cuts its shards where the first run stopped)
    _harvest(lm, tmp_path / "single", max_tokens=60)
    single, _ = _harvest(lm, tmp_path / "single", max_tokens=10_000)
    with _pool(model_dir) as pool:
        _harvest(lm, tmp_path / "ray", max_tokens=60, runner=ray_chunks(pool))  # a part first ...
        spread, stats = _harvest(lm, tmp_path / "ray", max_tokens=10_000, runner=ray_chunks(pool))  # ... resumed
    assert stats.tokens > 0 and len(single.shards) >= 3
    assert spread.shards == single.shards and spread.num_tokens == single.num_tokens
    for shard in single.shards:
        ours, theirs = load_file(str(spread.folder / shard["file"])), load_file(str(single.folder / shard["file"]))
        assert ours.keys() == theirs.keys()
        for name in ours:
            assert ours[name].equal(theirs[name]), (shard["file"], name)


def test_sweep_over_ray_gives_the_single_process_rows(cluster, model_dir, tmp_path):
    import torch

    from residlab import SteeringVector
    from residlab.distributed.ray_eval import RayEvaluator
    from residlab.methods.sweep import SweepConfig, run_sweep

    lm = _spec(model_dir).open().lm
    g = torch.Generator().manual_seed(0)
    vector = SteeringVector.from_layers({1: torch.randn(lm.hidden_size, generator=g)}, model=lm, source="test")
    path = vector.save(tmp_path / "vector.safetensors")
    rows = {}
    for name in ("single", "ray"):
        cfg = SweepConfig(model=str(model_dir), dtype="float32", engine="torch", vector=str(path), layers=(1,),
                          strengths=(0.0, 8.0), dataset="synthetic", offset=0, limit=4, max_new_tokens=6,
                          batch_size=2, work_dir=str(tmp_path / name))  # fmt: skip
        if name == "ray":
            with _pool(model_dir) as pool:
                payload = run_sweep(cfg, log=lambda _: None, evaluator=RayEvaluator(pool, progress=False))
        else:
            payload = run_sweep(cfg, log=lambda _: None)
        rows[name] = [{k: v for k, v in r.items() if k != "seconds_per_problem"} for r in payload["rows"]]
    assert rows["ray"] == rows["single"] and len(rows["single"]) == 2
