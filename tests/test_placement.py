"""Which world rank runs on which node (platform/launch/rank_placement.py).

The plan on its own (pure): EP groups on as few nodes as the slots allow, checked against every
possible assignment of small layouts, then pipeline neighbours together. Then on a Ray cluster of
three raylets on this machine (`ray.cluster_utils.Cluster`: a head without CPUs and two nodes of
two worker slots each), moeforge's pipeline path end to end through Ray Train (`launch_training`):
a DualPipe pp=2 x dp=2 x ep=2 run with ZeRO-1, tracked with W&B offline and evaluated, whose EP
groups (ranks 0 2 and 1 3, the two dp replicas of a stage) Ray Train's own numbering would split
over both nodes. The workers renumber themselves so that each EP group is on one node, the MoE
counts one node per token, what the workers post (DeepSpeed's collectives included) keeps NCCL's
rules, rank 0 gathers every rank's timeline and tracks the run, and the run matches the
single-process reference. The same layout on gloo processes is tests/test_ep_parity.py's.

The cluster is the test's own, in a subprocess with its own RAY_TMPDIR (so the session cluster of
conftest.py, and the cluster record other Ray users on this machine read, are never touched); the
subprocess runs in its own process group, which is ended, and nothing else, when it is done.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from moeforge.platform.config.builder import ConfigError
from moeforge.platform.engine.topology import Topology
from moeforge.platform.launch.rank_placement import WorkerSite, format_placement, match_plan
from moeforge.platform.launch.rank_placement_plan import PlacementPlan, plan_placement


def _every_plan(topo: Topology, slots: dict[str, int]):
    """Every assignment of the world ranks to nodes within their slots (small layouts only)."""
    nodes = list(slots)
    for assignment in itertools.product(nodes, repeat=topo.world_size):
        if all(assignment.count(n) <= slots[n] for n in nodes):
            yield PlacementPlan(topo, assignment)


def _ep_cost(plan: PlacementPlan) -> tuple[int, int]:
    spans = plan.ep_group_nodes()
    return sum(spans), max(spans)


# ---- the plan -------------------------------------------------------------------------------------
def test_ep2_on_two_nodes_of_four_keeps_the_topology_order():
    """pp=2 dp=4 ep=2 on 2 x 4 slots: a node holds two whole pipeline replicas, so each EP group
    (the two replicas of a stage) and every pipeline neighbour pair is inside one node."""
    topo = Topology(2, 4, "bidirectional", 2)
    plan = plan_placement(topo, {"a": 4, "b": 4})
    assert plan.node_of_rank == ("a",) * 4 + ("b",) * 4  # consecutive ranks: Ray Train's own order
    assert plan.ep_group_nodes() == [1, 1, 1, 1]
    assert plan.pipeline_links_across_nodes() == 0


def test_ep4_on_two_nodes_of_four_puts_each_ep_group_on_one_node():
    """pp=2 dp=4 ep=4: an EP group is the four dp replicas of a stage, ranks pp = 2 apart. Each gets
    a node to itself (the all-to-all stays inside it); the pipeline links must then cross."""
    topo = Topology(2, 4, "bidirectional", 4)
    plan = plan_placement(topo, {"a": 4, "b": 4})
    assert plan.ranks_on("a") == [0, 2, 4, 6] and plan.ranks_on("b") == [1, 3, 5, 7]
    assert plan.ep_group_nodes() == [1, 1]
    assert plan.pipeline_links_across_nodes() == 4
    # the topology's order would split both groups over both nodes
    naive = PlacementPlan(topo, ("a",) * 4 + ("b",) * 4)
    assert naive.ep_group_nodes() == [2, 2]


def test_pipeline_neighbours_share_a_node_once_ep_groups_are_inside_one():
    """pp=4 dp=2 ep=2 on 2 x 4: stages 0-1 on one node, 2-3 on the other, both replicas each."""
    plan = plan_placement(Topology(4, 2, "linear", 2), {"a": 4, "b": 4})
    assert plan.ranks_on("a") == [0, 1, 4, 5] and plan.ranks_on("b") == [2, 3, 6, 7]
    assert plan.ep_group_nodes() == [1, 1, 1, 1]
    assert plan.pipeline_links_across_nodes() == 2  # (1, 2) of each replica: the fewest possible


def test_spare_slots_use_the_fewest_nodes_and_no_ep():
    plan = plan_placement(Topology(2, 2, "bidirectional", 2), {"a": 4, "b": 4})
    assert set(plan.node_of_rank) == {"a"}
    plan = plan_placement(Topology(2, 2, "linear", 1), {"small": 2, "big": 8})
    assert set(plan.node_of_rank) == {"big"}  # the largest node first
    # ep = 1: the topology's order, node by node
    plan = plan_placement(Topology(2, 4, "linear", 1), {"a": 4, "b": 4})
    assert plan.node_of_rank == ("a",) * 4 + ("b",) * 4


@pytest.mark.parametrize(
    "pp, dp, ep, slots",
    [
        (2, 4, 2, {"a": 4, "b": 4}),
        (2, 4, 4, {"a": 4, "b": 4}),
        (4, 2, 2, {"a": 4, "b": 4}),
        (2, 2, 2, {"a": 2, "b": 2}),
        (2, 4, 2, {"a": 3, "b": 5}),  # uneven nodes: one EP group has to be split
        (1, 8, 4, {"a": 6, "b": 2}),
        (1, 6, 3, {"a": 2, "b": 2, "c": 2}),  # nodes smaller than an EP group
        (2, 4, 4, {"a": 3, "b": 3, "c": 4}),  # nodes smaller than a group, two slots to spare
        (3, 2, 2, {"a": 2, "b": 2, "c": 2}),
        (1, 4, 2, {"a": 3, "b": 3}),  # spare slots: a group is never split to fill a node
    ],
)
def test_plan_nodes_per_ep_group_is_minimal(pp, dp, ep, slots):
    """Against every assignment: no plan has fewer nodes per EP group in total, nor a smaller worst
    group; among those that tie, none cuts fewer pipeline links when the nodes are of one size and
    each holds whole EP groups (elsewhere the plan keeps neighbours together greedily)."""
    topo = Topology(pp, dp, "linear", ep)
    plan = plan_placement(topo, slots)
    assert sorted(plan.node_of_rank.count(n) for n in set(plan.node_of_rank)) <= sorted(slots.values())
    assert all(plan.node_of_rank.count(n) <= slots[n] for n in slots)
    best = min(_every_plan(topo, slots), key=lambda p: (*_ep_cost(p), p.pipeline_links_across_nodes()))
    assert _ep_cost(plan) == _ep_cost(best), (plan.node_of_rank, best.node_of_rank)
    if len(set(slots.values())) == 1 and all(count % ep == 0 for count in slots.values()):
        assert plan.pipeline_links_across_nodes() == best.pipeline_links_across_nodes()


def test_too_few_slots_are_refused():
    with pytest.raises(ConfigError, match="8 workers .* need 8 worker slots, the nodes have 6"):
        plan_placement(Topology(2, 4), {"a": 4, "b": 2})


# ---- realization: the plan matched to where Ray put the workers ------------------------------------
def _sites(per_node: list[int]) -> list[WorkerSite]:
    """Ray Train's numbering: the workers of a node are consecutive, nodes in order."""
    sites, ray_rank = [], 0
    for i, count in enumerate(per_node):
        for _ in range(count):
            sites.append(WorkerSite(ray_rank, f"node{i}", f"10.0.0.{i + 1}", 29500 + ray_rank))
            ray_rank += 1
    return sites


def test_ray_trains_order_is_kept_when_the_plan_agrees():
    placement = match_plan(Topology(2, 4, "bidirectional", 2), _sites([4, 4]))
    assert not placement.remapped and placement.rank_of_ray_rank == tuple(range(8))


def test_workers_take_their_nodes_planned_ranks():
    topo = Topology(2, 4, "bidirectional", 4)
    placement = match_plan(topo, _sites([4, 4]))
    assert placement.remapped
    # node0's workers (Ray Train ranks 0-3) are world ranks 0 2 4 6, node1's are 1 3 5 7
    assert placement.rank_of_ray_rank == (0, 2, 4, 6, 1, 3, 5, 7)
    for rank in range(8):
        assert placement.site_of_rank(rank).node_id == placement.plan.node_of_rank[rank]
    assert placement.node_ids([0, 2, 4, 6]) == ["node0"] * 4  # an EP group's nodes, for the MoE
    record = placement.to_dict()
    assert [g["nodes"] for g in record["ep_groups"]] == [1, 1]
    assert record["nodes"][0] == {"node_id": "node0", "node_ip": "10.0.0.1", "ranks": [0, 2, 4, 6]}
    assert record["ranks"][1] == {
        "rank": 1,
        "ray_rank": 4,
        "node_id": "node1",
        "node_ip": "10.0.0.2",
        "pp_rank": 1,
        "dp_rank": 0,
        "ep_rank": 0,
    }
    json.dumps(record)  # placement.json


def test_uneven_nodes_are_matched_slot_for_slot():
    topo = Topology(2, 4, "linear", 2)
    placement = match_plan(topo, _sites([3, 5]))
    counts = {n: placement.plan.node_of_rank.count(n) for n in ("node0", "node1")}
    assert counts == {"node0": 3, "node1": 5}
    assert sorted(placement.rank_of_ray_rank) == list(range(8))


def test_failures_name_the_placements_ranks():
    """Ray Train keys a failed worker by its own rank; the driver names the pipeline's rank."""
    from moeforge.platform.launch.ray_train import describe_failure

    failed = Exception("training failed")
    failed.worker_failures = {2: RuntimeError("injected"), 1: TimeoutError("PeerTimeout: waiting")}

    rank_of_ray_rank = dict(
        enumerate(match_plan(Topology(2, 2, "linear", 2), _sites([2, 2])).rank_of_ray_rank)
    )
    assert rank_of_ray_rank == {0: 0, 1: 2, 2: 1, 3: 3}
    assert describe_failure(failed, rank_of_ray_rank) == (
        "pipeline run failed on rank 1: RuntimeError: injected; rank 2: TimeoutError: PeerTimeout: waiting"
    )


def test_the_printed_mapping_is_one_aligned_table():
    placement = match_plan(Topology(2, 4, "bidirectional", 4), _sites([4, 4]))
    text = format_placement(placement.to_dict())
    print(text)
    lines = text.splitlines()
    assert lines[0].startswith("placement: 8 ranks (pp=2 dp=4 ep=4) on 2 node(s)")
    table = lines[1:10]
    assert table[0].split() == ["rank", "ray", "rank", "node", "node", "ip", "pp", "dp", "ep"]
    assert len({len(line) for line in table}) == 1  # aligned
    assert table[2].split() == ["1", "4", "1", "10.0.0.2", "1", "0", "0"]
    assert "node 0: node0  10.0.0.1  ranks 0 2 4 6" in lines
    assert lines[-1] == "EP groups: 2, nodes per group 1 at most; pipeline links across nodes: 4 of 4"


# ---- on a Ray cluster of several nodes ---------------------------------------------------------------
STEPS = 2


def _drive(spec_path: str) -> None:
    """Subprocess: a 3-raylet cluster (head without CPUs, two nodes of 2 CPUs and 2 `moeforge_worker`
    slots), a DualPipe pp=2 dp=2 ep=2 ZeRO-1 run on it, tracked and evaluated; writes the summary
    and the nodes to spec['out']."""
    import ray
    from moeforge.platform.config import TrainConfig
    from moeforge.platform.launch.ray_train import launch_training
    from pipeline_cases import pipeline_config
    from ray.cluster_utils import Cluster

    with open(spec_path) as f:
        spec = json.load(f)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        nodes = [cluster.add_node(num_cpus=2, resources={"moeforge_worker": 2}) for _ in range(2)]
        ray.init(address=cluster.address, log_to_driver=True)
        raw = pipeline_config(
            spec["run_dir"], "dualpipe", 2, 2, 4, zero_stage=1, ep=2, resources={"worker_resources": {"moeforge_worker": 1}}
        )
        raw["run"].update(steps=STEPS, eval_every=2, eval_batches=1)
        raw["tracking"] = {"backend": "wandb", "mode": "offline", "log_timeline": True}
        # One expert group: a token's two experts may sit on both EP ranks, so the nodes a token
        # reaches show where the ranks are (with tiny's 2 groups, 1 kept, each token reaches 1 rank).
        raw["model"].update(n_group=1, topk_group=1)
        summary = launch_training(TrainConfig.from_dict(raw), raw)
        out = {"summary": summary, "worker_nodes": [n.node_id for n in nodes], "raw": raw}
    finally:
        ray.shutdown()
        cluster.shutdown()
    with open(spec["out"], "w") as f:
        json.dump(out, f)


def _stop_group(proc: subprocess.Popen) -> None:
    """End what is left of the subprocess's process group (its Ray processes), and only that."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            continue


def run_in_own_process(script: str, spec: dict, tmp_path, timeout_s: float, env: dict | None = None) -> dict:
    """Run `python <script> <spec.json>` in its own process group with its own RAY_TMPDIR, in the
    environment `env` (default: this one without RAY_ADDRESS); return the JSON it wrote to
    spec['out'], with its console output under "console" (failing with the console's tail when it
    wrote none). Whatever the process group still holds afterwards is ended."""
    ray_tmp = tempfile.mkdtemp(prefix="mf-")  # short: Ray's socket paths must fit 107 bytes
    spec = {**spec, "out": str(tmp_path / "out.json")}
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    log_path = tmp_path / "driver.log"
    if env is None:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env = {**env, "RAY_TMPDIR": ray_tmp, "OMP_NUM_THREADS": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, script, str(spec_path)],
            cwd=str(tmp_path),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
        finally:
            _stop_group(proc)
            shutil.rmtree(ray_tmp, ignore_errors=True)
    console = log_path.read_text()
    if proc.returncode != 0 or not os.path.exists(spec["out"]):
        pytest.fail(f"driver exited with {proc.returncode}:\n{console[-6000:]}")
    with open(spec["out"]) as f:
        result = json.load(f)
    result["console"] = console
    return result


def test_multi_node_run_follows_the_plan(tmp_path, monkeypatch):
    from moeforge.platform.engine.comm_record import RECORD_ENV
    from moeforge.platform.engine.nccl_rules import load_records, summarize, violations
    from pipeline_cases import (
        assert_matches_reference,
        assert_timeline_runs_schedule,
        dump_grads,
        pipeline_record,
        read_metrics,
        reference_run,
    )

    dump_grads(monkeypatch)  # the run's workers (a process of its own) write their step-1 gradients
    # ... and record what they post, held to NCCL's rules as the gloo cases of test_nccl_order.py are
    monkeypatch.setenv(RECORD_ENV, str(tmp_path / "comm"))

    run_dir = tmp_path / "run"
    # A bound on a hang, not a timing: under the full suite this run has taken 170-240 s.
    result = run_in_own_process(__file__, {"run_dir": str(run_dir)}, tmp_path, timeout_s=480)
    record = json.loads((run_dir / "placement.json").read_text())
    nodes = {row["rank"]: row["node_id"] for row in record["ranks"]}
    # two workers on each worker node (the head has no CPUs), and each EP group on one of them
    assert set(nodes.values()) == set(result["worker_nodes"])
    assert nodes[0] == nodes[2] != nodes[1] == nodes[3]
    assert [g["ranks"] for g in record["ep_groups"]] == [[0, 2], [1, 3]]
    assert [g["nodes"] for g in record["ep_groups"]] == [1, 1]
    # Ray Train numbered the workers node by node (0 1 | 2 3): the workers renumbered themselves
    assert record["remapped"] and sorted(row["ray_rank"] for row in record["ranks"]) == [0, 1, 2, 3]
    # rank 0 printed the mapping at start
    console = result["console"]
    print("\n".join(line for line in console.splitlines() if "[rank 0]" in line))  # for `pytest -s`
    assert "[rank 0] placement: 4 ranks (pp=2 dp=2 ep=2) on 2 node(s), ranks renumbered" in console
    assert "[rank 0] EP groups: 2, nodes per group 1 at most; pipeline links across nodes: 2 of 2" in console

    per_rank = load_records(str(tmp_path / "comm"))
    assert sorted(per_rank) == [0, 1, 2, 3] and summarize(per_rank).p2p_ops > 0
    found = violations(per_rank)
    assert not found, "\n".join(found[:8])

    # rank 0 recorded the run: per-step metrics with the pipeline fields
    steps = read_metrics(run_dir)
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    for key in PIPELINE_METRICS:
        assert key in steps[-1], key
    assert "mfu" not in steps[-1]  # no resources.peak_tflops_per_worker: no MFU, rather than 0
    assert steps[-1]["max_expert_load"] >= steps[-1]["mean_expert_load"] > 0
    # the MoE took its node ids from the placement: tokens reach both EP ranks, never two nodes
    for step in steps:
        assert step["ep_ranks_per_token_max"] == 2 and step["ep_nodes_per_token_max"] == 1
    _assert_wandb_ran_on_rank_0(run_dir, steps=STEPS)
    # the gathered timeline holds every world rank's forwards and sends, each rank's the
    # simulator's action list, with the recorded bubble and exposed communication
    trace = json.loads((run_dir / "timeline.json").read_text())["traceEvents"]
    for kind in ("F", "SEND"):
        assert {e["tid"] for e in trace if e.get("ph") == "X" and e["cat"] == kind} == {0, 1, 2, 3}, kind
    assert (run_dir / "timeline.png").stat().st_size > 0
    assert_timeline_runs_schedule(run_dir, "dualpipe", 2, 2, 4)

    # and the renumbered run computes what one process does
    summary = result["summary"]
    assert summary["steps"] == STEPS and summary["losses"] == pipeline_record(run_dir).losses
    assert summary["final_loss"] == summary["losses"][-1]
    untracked = {**result["raw"], "tracking": {"log_timeline": False}}
    assert_matches_reference(
        pipeline_record(run_dir),
        reference_run(untracked, tmp_path / "reference"),
        label="Ray, 2 nodes, dualpipe pp=2 dp=2 ep=2 ZeRO-1",
    )


PIPELINE_METRICS = (
    "loss",
    "mtp_loss",
    "aux_loss",
    "grad_norm",
    "lr",
    "tokens_per_s",
    "bubble_fraction",
    "exposed_comm_s",
    "max_expert_load",
    "mean_expert_load",
)


def _assert_wandb_ran_on_rank_0(run_dir, steps: int) -> None:
    """One offline W&B run, written by rank 0 only: every step's metrics with the pipeline's and
    the evaluation's, the timeline image, the summary."""
    import glob

    from test_tracking import read_wandb_records

    (wandb_file,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = read_wandb_records(wandb_file)
    history = [r.history for r in records if r.WhichOneof("record_type") == "history"]
    assert sorted({h.step.num for h in history}) == list(range(1, steps + 1))
    keys = {item.key or "/".join(item.nested_key) for h in history for item in h.item}
    expected = {"loss", "mtp_loss", "aux_loss", "grad_norm", "lr", "tokens_per_s", "eval_loss"}
    expected |= {"bubble_fraction", "exposed_comm_s", "max_expert_load", "mean_expert_load", "timeline/_type"}
    assert expected <= keys, expected - keys
    summary_keys = {
        i.key for r in records if r.WhichOneof("record_type") == "summary" for i in r.summary.update
    }
    assert {"final_loss", "tokens_per_s", "bubble_fraction", "eval_loss"} <= summary_keys, summary_keys
    assert glob.glob(
        str(run_dir / "wandb" / "offline-run-*" / "files" / "media" / "images" / "timeline*.png")
    )


if __name__ == "__main__":  # the subprocess of test_multi_node_run_follows_the_plan
    _drive(sys.argv[1])
