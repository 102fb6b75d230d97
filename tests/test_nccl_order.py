"""What every rank of a real gloo training run posts, held to NCCL's rules.

gloo matches transfers by (source, tag), so a CPU run completes whatever order its ranks post in;
NCCL runs the ungrouped point-to-point ops of one (group, pair) in posting order on one stream, and
needs every member of a group to issue its collectives in the same order. Each case here trains one
step and evaluates once (the forward-only lists) with every rank recording its torch.distributed
calls (MOEFORGE_RECORD_COMM, platform/engine/comm_record.py), then checks the recording with
platform/engine/nccl_rules.py: every schedule at pp 2 and 4, several receive lookaheads, ZeRO's
collectives, expert parallelism with and without the overlapped F&B pair. The rule checker itself
is tested on hand-made recordings that break each rule.
"""

from __future__ import annotations

import json

import pytest
from moeforge.platform.engine.comm_record import RECORD_ENV
from moeforge.platform.engine.nccl_rules import load_records, summarize, violations
from moeforge.platform.launch.local_spawn import spawn_gloo
from moeforge.platform.train.pipeline import train_from_dict
from pipeline_cases import pipeline_config

# (schedule, pp, dp, micro-batches, ZeRO stage, receive lookahead, extra parallel settings)
LAYOUTS = [
    ("1f1b", 2, 1, 2, 1, 1, {}),
    ("1f1b", 4, 1, 4, 0, 3, {}),
    ("zb1p", 2, 1, 4, 0, 2, {}),
    ("zb1p", 4, 1, 4, 1, 8, {}),
    ("dualpipe", 2, 1, 4, 1, 2, {}),
    ("dualpipe", 4, 1, 8, 0, 1, {}),
    ("dualpipev", 2, 1, 4, 0, 4, {}),
    ("dualpipev", 4, 1, 8, 0, 2, {}),
    ("dualpipe", 2, 2, 4, 1, 2, {"ep": 2, "chunk_phases": True, "overlap": False}),
    ("dualpipe", 2, 2, 4, 1, 2, {"ep": 2, "chunk_phases": True, "overlap": True}),
]


def _case_id(case) -> str:
    schedule, pp, dp, _microbatches, zero, lookahead, extra = case
    name = f"{schedule}-pp{pp}-dp{dp}-zero{zero}-look{lookahead}"
    if extra.get("ep"):
        name += f"-ep{extra['ep']}" + ("-overlap" if extra.get("overlap") else "")
    return name


@pytest.mark.parametrize("case", LAYOUTS, ids=[_case_id(c) for c in LAYOUTS])
def test_training_posts_in_an_order_nccl_accepts(tmp_path, monkeypatch, case):
    schedule, pp, dp, microbatches, zero, lookahead, extra = case
    layers = 8 if schedule == "dualpipev" and pp == 4 else 4  # a stage per rank and chunk
    raw = pipeline_config(
        tmp_path / "run", schedule, pp, dp, microbatches, zero, recv_lookahead=lookahead, **extra
    )
    raw["model"]["num_hidden_layers"] = layers
    raw["run"].update(steps=1, eval_every=1, eval_batches=1)
    raw["tracking"]["log_timeline"] = False
    monkeypatch.setenv(RECORD_ENV, str(tmp_path / "comm"))
    spawn_gloo(train_from_dict, pp * dp, (raw, True))

    per_rank = load_records(str(tmp_path / "comm"))
    summary = summarize(per_rank)
    assert summary.ranks == list(range(pp * dp))
    # the recording saw the pipeline's transfers, training's and evaluation's, and collectives
    assert summary.p2p_ops > 0 and summary.pairs >= pp - 1
    assert summary.collectives
    found = violations(per_rank)
    assert not found, "\n".join(found[:8])
    if extra.get("ep"):
        # the MoE token counts travel on a group of their own, never behind a bulk all-to-all
        a2a = [e for entries in per_rank.values() for e in entries if e["op"] == "all_to_all_single"]
        counts = {e["group"] for e in a2a if "exchange_counts" in e["site"]}
        bulk = {e["group"] for e in a2a if "exchange_counts" not in e["site"]}
        assert counts and bulk and not counts & bulk


# ---- the rule checker on hand-made recordings --------------------------------------------------------


def _p2p(rank, op, peer, nbytes=64, group="g"):
    return {"rank": rank, "op": op, "peer": peer, "bytes": nbytes, "group": group, "members": [0, 1], "site": "s"}


def _coll(rank, op, group="w", numel=None):
    return {"rank": rank, "op": op, "group": group, "members": [0, 1], "numel": numel, "site": "s"}


def _numbered(per_rank):
    for entries in per_rank.values():
        for seq, e in enumerate(entries):
            e["seq"] = seq
    return per_rank


def test_rules_accept_matching_sequences_and_grouped_ops():
    per_rank = _numbered({
        0: [_p2p(0, "isend", 1), _p2p(0, "irecv", 1, 32), _coll(0, "all_reduce", numel=4),
            {"rank": 0, "op": "batch_isend_irecv", "group": "g", "members": [0, 1], "site": "s",
             "ops": [{"op": "irecv", "peer": 1, "bytes": 8}, {"op": "isend", "peer": 1, "bytes": 16}]}],
        1: [_p2p(1, "irecv", 0), _p2p(1, "isend", 0, 32), _coll(1, "all_reduce", numel=4),
            {"rank": 1, "op": "batch_isend_irecv", "group": "g", "members": [0, 1], "site": "s",
             "ops": [{"op": "irecv", "peer": 0, "bytes": 16}, {"op": "isend", "peer": 0, "bytes": 8}]}],
    })
    assert violations(per_rank) == []


@pytest.mark.parametrize(
    "rank0, rank1, reason",
    [
        ([("irecv", 64)], [("irecv", 64)], "both receive first"),
        ([("isend", 64)], [("isend", 64)], "both send first"),
        ([("isend", 64)], [("irecv", 32)], "sizes or directions differ"),
        ([("isend", 64), ("isend", 64)], [("irecv", 64)], "posts nothing more"),
    ],
)
def test_rules_refuse_what_nccl_would_hang_or_mismatch_on(rank0, rank1, reason):
    per_rank = _numbered({
        0: [_p2p(0, op, 1, n) for op, n in rank0],
        1: [_p2p(1, op, 0, n) for op, n in rank1],
    })
    found = violations(per_rank)
    assert len(found) == 1 and reason in found[0] and "ranks 0<->1" in found[0]


def test_rules_keep_groups_apart_and_check_collective_order():
    # one direction per group: both receive first, but on different groups (streams) — legal
    apart = _numbered({
        0: [_p2p(0, "irecv", 1, group="b->a"), _p2p(0, "isend", 1, group="a->b")],
        1: [_p2p(1, "irecv", 0, group="a->b"), _p2p(1, "isend", 0, group="b->a")],
    })
    assert violations(apart) == []
    swapped = _numbered({
        0: [_coll(0, "all_reduce", numel=4), _coll(0, "all_to_all_single")],
        1: [_coll(1, "all_to_all_single"), _coll(1, "all_reduce", numel=4)],
    })
    found = violations(swapped)
    assert len(found) == 1 and "collective #0" in found[0] and "all_to_all_single" in found[0]
    sizes = _numbered({0: [_coll(0, "all_reduce", numel=4)], 1: [_coll(1, "all_reduce", numel=5)]})
    assert violations(sizes)


def _renumber_and_reduce(rank, world_size, directory):
    """What a Ray worker does when the placement renumbers it: a collective on the first default
    group, the group destroyed and made again with the other rank, a collective on the new one."""
    import socket

    import torch
    import torch.distributed as dist
    from moeforge.platform.engine.comm_record import start_recording

    start_recording(directory)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ports = [None] * world_size
    dist.all_gather_object(ports, port)
    dist.destroy_process_group()
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{ports[0]}", rank=world_size - 1 - rank, world_size=world_size
    )
    dist.all_reduce(torch.ones(3))
    return dist.get_rank()


def test_a_group_made_again_after_the_world_is_destroyed_is_another_group(tmp_path):
    """torch names the new default group as the old one; the recording keeps them apart, so the
    calls of the ranks before and after the renumbering are not matched with each other."""
    assert spawn_gloo(_renumber_and_reduce, 2, (str(tmp_path),)) == {0: 1, 1: 0}
    per_rank = load_records(str(tmp_path))
    groups = {(e["op"], e["group"]) for entries in per_rank.values() for e in entries}
    assert groups == {("all_gather_object", "0"), ("all_reduce", "0/1")}, groups
    assert violations(per_rank) == []
    assert summarize(per_rank).collectives == {"0": 1, "0/1": 1}


def test_checker_command(tmp_path, capsys):
    from moeforge.platform.engine.nccl_rules import main

    assert main([str(tmp_path / "missing")]) == 2
    (tmp_path / "comm.1.jsonl").write_text(
        "\n".join(json.dumps(e) for e in _numbered({0: [_p2p(0, "irecv", 1)], 1: [_p2p(1, "irecv", 0)]})[0])
        + "\n"
    )
    (tmp_path / "comm.2.jsonl").write_text(json.dumps({**_p2p(1, "irecv", 0), "seq": 0}) + "\n")
    assert main([str(tmp_path)]) == 1
    assert "both receive first" in capsys.readouterr().out
