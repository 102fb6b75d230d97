"""Hold recorded torch.distributed calls (`comm_record`) to NCCL's matching rules.

NCCL, as PyTorch's ProcessGroupNCCL drives it:

- point-to-point: the ungrouped `isend`/`irecv` ops between two ranks of one process group share
  one communicator and one CUDA stream and run in posting order; NCCL has no tags. A receive
  blocks its stream until the data arrives. So for every (process group, pair of ranks) the two
  sides' sequences must match op for op: the k-th op of rank A is a send to B exactly when the
  k-th op of B is a receive from A, of the same size. Two ranks that each post a receive first
  wait for each other forever; two sends first may too (large messages need the receiver), and a
  size mismatch hands one transfer another's bytes. A `batch_isend_irecv` is one grouped op: its
  ops with one peer form one step of that pair's sequence, matched as a whole.
- collectives: every member of a process group issues the group's collectives in the same order
  (the same function; for all_reduce, broadcast and reduce the same number of elements).

`violations(per_rank)` lists every break of these rules (the first per pair or group), each
naming the group, the ranks, the position and both call sites. `python -m
moeforge.platform.engine.nccl_rules DIR` checks a recorded directory (exit 1 on a violation).
"""

from __future__ import annotations

import glob
import json
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field

from moeforge.platform.engine.comm_record import COLLECTIVES, POINT_TO_POINT


@dataclass
class Step:
    """One step of a (group, pair) stream on one side: what it sends to and receives from the peer."""

    sends: list[int] = field(default_factory=list)  # bytes, in posting order
    recvs: list[int] = field(default_factory=list)
    site: str = ""
    grouped: bool = False

    def describe(self) -> str:
        parts = [f"send {b} B" for b in self.sends] + [f"recv {b} B" for b in self.recvs]
        what = " + ".join(parts)
        return f"[{what}] (grouped)" if self.grouped else what


@dataclass
class Summary:
    """What a recording holds: enough for a test to see the check had something to look at."""

    ranks: list[int]
    p2p_ops: int
    pairs: int
    collectives: dict[str, int]  # group -> calls per member (the first member's count)


def load_records(directory: str) -> dict[int, list[dict]]:
    """Every recorded call in `directory`, per world rank, in posting order."""
    files = sorted(glob.glob(os.path.join(directory, "comm.*.jsonl")))
    if not files:
        raise FileNotFoundError(f"{directory}: no comm.*.jsonl recordings")
    per_rank: dict[int, list[dict]] = defaultdict(list)
    for path in files:
        with open(path) as f:
            entries = [json.loads(line) for line in f if line.strip()]
        for entry in sorted(entries, key=lambda e: e["seq"]):
            per_rank[entry["rank"]].append(entry)
    return dict(per_rank)


def _streams(per_rank: dict[int, list[dict]]) -> dict[tuple[str, int, int], dict[int, list[Step]]]:
    """(group, low rank, high rank) -> rank -> its steps on that pair's stream."""
    streams: dict[tuple[str, int, int], dict[int, list[Step]]] = defaultdict(lambda: defaultdict(list))
    for rank, entries in per_rank.items():
        for e in entries:
            if e["op"] in POINT_TO_POINT:
                ops, grouped = [{"op": e["op"], "peer": e["peer"], "bytes": e["bytes"]}], False
            elif e["op"] == "batch_isend_irecv":
                ops, grouped = e["ops"], True
            else:
                continue
            by_peer: dict[int, Step] = {}
            for op in ops:
                step = by_peer.setdefault(op["peer"], Step(site=e["site"], grouped=grouped))
                (step.sends if op["op"] in ("isend", "send") else step.recvs).append(op["bytes"])
            for peer, step in by_peer.items():
                streams[(e["group"], min(rank, peer), max(rank, peer))][rank].append(step)
    return streams


def _p2p_violations(per_rank: dict[int, list[dict]]) -> list[str]:
    out = []
    for (group, a, b), sides in sorted(_streams(per_rank).items()):
        steps_a, steps_b = sides.get(a, []), sides.get(b, [])
        for k in range(max(len(steps_a), len(steps_b))):
            if k >= len(steps_a) or k >= len(steps_b):
                longer, rank, other = (steps_a, a, b) if k < len(steps_a) else (steps_b, b, a)
                out.append(
                    f"group {group}, ranks {a}<->{b}, op #{k}: rank {rank} posts "
                    f"{longer[k].describe()} at {longer[k].site}; rank {other} posts nothing more on "
                    "this pair (NCCL would wait for it forever)"
                )
                break
            sa, sb = steps_a[k], steps_b[k]
            if sa.sends == sb.recvs and sa.recvs == sb.sends:
                continue
            if sa.recvs and sb.recvs and not sa.sends and not sb.sends:
                why = "both receive first: each stream waits for the other forever"
            elif sa.sends and sb.sends and not sa.recvs and not sb.recvs:
                why = "both send first: each send waits for a receive the other has not posted"
            else:
                why = "the sizes or directions differ: NCCL would pair these ops"
            out.append(
                f"group {group}, ranks {a}<->{b}, op #{k}: rank {a} posts {sa.describe()} at {sa.site}; "
                f"rank {b} posts {sb.describe()} at {sb.site} ({why})"
            )
            break
    return out


def _collective_calls(per_rank: dict[int, list[dict]]):
    """group -> (members, rank -> [(op, numel, site)])."""
    calls: dict[str, tuple[list[int], dict[int, list]]] = {}
    for rank, entries in per_rank.items():
        for e in entries:
            if e["op"] not in COLLECTIVES:
                continue
            _, by_rank = calls.setdefault(e["group"], (e["members"], defaultdict(list)))
            by_rank[rank].append((e["op"], e.get("numel"), e["site"]))
    return calls


def _collective_violations(per_rank: dict[int, list[dict]]) -> list[str]:
    out = []
    recorded = set(per_rank)
    for group, (members, by_rank) in sorted(_collective_calls(per_rank).items()):
        present = [m for m in members if m in recorded]
        if len(present) < 2:
            continue
        first = present[0]
        ref = by_rank.get(first, [])
        for rank in present[1:]:
            mine = by_rank.get(rank, [])
            for k in range(max(len(ref), len(mine))):
                a = ref[k] if k < len(ref) else None
                b = mine[k] if k < len(mine) else None
                if a is not None and b is not None and a[:2] == b[:2]:
                    continue

                def show(call):
                    if call is None:
                        return "nothing"
                    op, numel, site = call
                    return f"{op}{'' if numel is None else f' of {numel}'} at {site}"

                out.append(
                    f"group {group} {members}, collective #{k}: rank {first} issues {show(a)}; "
                    f"rank {rank} issues {show(b)} (every member must issue the same collectives "
                    "in the same order)"
                )
                break
    return out


def violations(per_rank: dict[int, list[dict]]) -> list[str]:
    """Every break of NCCL's point-to-point and collective-order rules in the recording."""
    return _p2p_violations(per_rank) + _collective_violations(per_rank)


def summarize(per_rank: dict[int, list[dict]]) -> Summary:
    p2p = sum(1 for entries in per_rank.values() for e in entries if e["op"] in POINT_TO_POINT)
    p2p += sum(len(e["ops"]) for entries in per_rank.values() for e in entries if e["op"] == "batch_isend_irecv")
    collectives = {}
    for group, (_, by_rank) in _collective_calls(per_rank).items():
        collectives[group] = max(len(v) for v in by_rank.values())
    return Summary(sorted(per_rank), p2p, len(_streams(per_rank)), collectives)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m moeforge.platform.engine.nccl_rules DIR (a comm_record directory)")
        return 2
    try:
        per_rank = load_records(args[0])
    except FileNotFoundError as err:
        print(err)
        return 2
    found = violations(per_rank)
    s = summarize(per_rank)
    print(
        f"{len(s.ranks)} ranks, {s.p2p_ops} point-to-point ops on {s.pairs} (group, pair) streams, "
        f"{sum(s.collectives.values())} collective calls on {len(s.collectives)} groups"
    )
    for line in found:
        print("VIOLATION " + line)
    print("NCCL order: " + ("ok" if not found else f"{len(found)} violation(s)"))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
