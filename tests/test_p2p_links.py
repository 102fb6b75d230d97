"""The point-to-point endpoint on its links (spawned gloo ranks): waits that poll from the host with
a timeout on gloo and leave the host free on NCCL, and a step's timeline read through its clock.

On NCCL, `P2P(host_waits=False)` calls `work.wait()` without a timeout, which only makes the
current stream wait: a run then leaves dead peers to the process group's timeout and watchdog.
Here the same setting on gloo must outlast a peer that answers later than `timeout_s`, where the
gloo setting raises PeerTimeout naming the peer.
"""

from __future__ import annotations

import time

import pytest
import torch
from moeforge.platform.engine.executor import PipelineExecutor, SleepCompute
from moeforge.platform.engine.p2p import P2P, PeerTimeout, open_links
from moeforge.platform.engine.step_clock import HostClock, clock_for
from moeforge.platform.engine.topology import Topology, create_links
from moeforge.platform.launch.local_spawn import spawn_gloo
from moeforge.platform.schedules import build_schedule


def _late_sender(rank: int, world_size: int, host_waits: bool) -> str:
    links_list = Topology(2, 1).p2p_links()
    links = create_links(links_list, rank)
    p2p = P2P(rank, 0.3, links, name=f"rank {rank}", host_waits=host_waits)
    open_links(p2p, links_list)
    if rank == 1:
        time.sleep(1.5)  # answers well after the receiver's timeout_s
        try:
            p2p.wait(p2p.isend(torch.full((4,), 7.0), 0, tag=0, label="late"))
        except (PeerTimeout, RuntimeError):  # gloo closes the pair on the receiver's timeout
            return "receiver gave up"
        return "sent"
    try:
        got = p2p.wait(p2p.irecv((4,), torch.float32, 1, tag=0, label="late"))
    except PeerTimeout as err:
        return f"timeout: {err}"
    return f"received {got.tolist()}"


@pytest.mark.parametrize("host_waits", [True, False])
def test_waits_time_out_on_the_host_only_when_asked(host_waits):
    result = spawn_gloo(_late_sender, 2, (host_waits,))[0]
    if host_waits:
        assert result.startswith("timeout: rank 0: receiving late from rank 1 did not complete within")
        assert "parallel.p2p_timeout_s=0.3s" in result
    else:
        assert result == "received [7.0, 7.0, 7.0, 7.0]"


class _Mark:
    """An opaque mark, as a CUDA event is: no arithmetic, only the clock can read it."""

    def __init__(self, t: float) -> None:
        self.t = t


class _OpaqueClock(HostClock):
    def now(self) -> _Mark:
        return _Mark(super().now())

    def seconds(self, mark: _Mark) -> float:
        return mark.t


def _step_with_opaque_marks(rank: int, world_size: int) -> dict:
    links_list = Topology(2, 1).p2p_links()
    p2p = P2P(rank, 30.0, create_links(links_list, rank), timeline_rank=rank, clock=_OpaqueClock())
    open_links(p2p, links_list)
    schedule = build_schedule("1f1b", 2, 4)
    compute = SleepCompute(0.01, 0.02, 0.0, (8,))
    executor = PipelineExecutor(schedule, rank, compute, p2p, world_rank_of=lambda q: q, act_shape=(8,))
    trace = executor.run()
    kinds = {r.kind for r in trace.records}
    return {
        "floats": all(isinstance(r.start, float) and isinstance(r.end, float) for r in trace.records),
        "kinds": sorted(kinds),
        "busy": trace.busy_s,
        "busy_from_records": sum(r.end - r.start for r in trace.records if r.kind in ("F", "BW")),
        "step": trace.step_s,
    }


def test_the_timeline_is_read_through_the_step_clock():
    """The executor and endpoint only mark and hand marks to the clock (CUDA events on a GPU): every
    record comes back in seconds, and busy time is the sum of the compute records."""
    for result in spawn_gloo(_step_with_opaque_marks, 2).values():
        assert result["floats"]
        assert {"F", "BW", "SEND", "RECV"} <= set(result["kinds"])
        assert result["busy"] == pytest.approx(result["busy_from_records"])
        assert 0 < result["busy"] <= result["step"]


def test_clock_follows_the_device():
    assert isinstance(clock_for("cpu"), HostClock)
    assert type(clock_for(torch.device("cuda", 0))).__name__ == "CudaEventClock"
