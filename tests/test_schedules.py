"""Schedule generators, stage placement, the file format and the validator (accepts and rejects)."""

from dataclasses import replace

import pytest
from moeforge.platform.schedules import (
    GENERATORS,
    Action,
    Kind,
    ScheduleError,
    build_schedule,
    forward_only,
    parse_action,
    validate,
)
from moeforge.platform.schedules.io import format_schedule, load_schedule, parse_schedule
from moeforge.platform.schedules.validate import peak_live_activations


def legal_settings():
    for pp in (1, 2, 3, 4, 8):
        for m in sorted({1, pp, pp + 1, 2 * pp, 2 * pp + 2, 3 * pp}):
            yield "1f1b", pp, m
            yield "zb1p", pp, m
            if m >= 2 * pp:
                yield "dualpipev", pp, m
                if pp % 2 == 0 and m % 2 == 0:
                    yield "dualpipe", pp, m


@pytest.mark.parametrize("name,pp,m", list(legal_settings()))
def test_generated_schedule_validates(name, pp, m):
    schedule = build_schedule(name, pp, m)
    validate(schedule)
    validate(forward_only(schedule))  # evaluation's lists over the same placement
    assert peak_live_activations(schedule) == schedule.claimed_peak_activations
    for acts in schedule.actions:
        for action in acts:
            assert parse_action(str(action)) == action


def test_generated_kinds():
    """1f1b uses full backwards only; zb1p splits every backward; DualPipe overlaps F&B pairs."""
    kinds = {n: {a.kind for acts in build_schedule(n, 4, 8).actions for a in acts} for n in GENERATORS}
    assert Kind.BW in kinds["1f1b"] and not {Kind.B, Kind.W, Kind.FB} & kinds["1f1b"]
    assert {Kind.B, Kind.W} <= kinds["zb1p"] and not {Kind.BW, Kind.FB} & kinds["zb1p"]
    for name in ("dualpipe", "dualpipev"):
        assert {Kind.F, Kind.B, Kind.W, Kind.BW, Kind.FB} <= kinds[name]


def test_dualpipe_rank0_phases():
    """Rank 0 of DualPipe pp=8, M=20 (as in DualPipe's figure): 6 warm-up forwards of direction 0,
    one F0/F1 pair, three B/W/F zero-bubble triples of direction 1, then overlapped pairs."""
    acts = [str(a) for a in build_schedule("dualpipe", 8, 20).actions[0] if a.kind.is_compute]
    assert acts[:8] == ["F0.0", "F0.1", "F0.2", "F0.3", "F0.4", "F0.5", "F0.6", "F1.10"]
    assert acts[8:17] == ["B1.10", "W1.10", "F1.11", "B1.11", "W1.11", "F1.12", "B1.12", "W1.12", "F1.13"]
    assert acts[17:19] == ["F0.7&BW1.13", "F1.14&BW0.0"]
    assert acts[-1].startswith("W")


def test_dualpipe_mirrors_ranks():
    """Rank pp-1-r runs rank r's program with the two chunks (directions) swapped."""
    s = build_schedule("dualpipe", 8, 20)
    half = 10

    def mirrored(a: Action) -> Action:
        if a.kind is Kind.FB:
            return replace(
                a, chunk=1 - a.chunk, mb=(a.mb + half) % 20, b_chunk=1 - a.b_chunk, b_mb=(a.b_mb + half) % 20
            )
        return replace(a, chunk=1 - a.chunk, mb=(a.mb + half) % 20)

    for r in range(8):
        mine = [a for a in s.actions[r] if a.kind.is_compute]
        theirs = [mirrored(a) for a in s.actions[7 - r] if a.kind.is_compute]
        assert mine == theirs


@pytest.mark.parametrize(
    "name,pp,m,param",
    [
        ("dualpipe", 3, 12, "pp"),
        ("dualpipe", 4, 9, "microbatches"),
        ("dualpipe", 4, 6, "microbatches"),
        ("dualpipev", 4, 7, "microbatches"),
        ("1f1b", 0, 4, "pp"),
        ("zb1p", 2, 0, "microbatches"),
        ("gpipe", 2, 4, "schedule"),
    ],
)
def test_invalid_parameters_name_the_parameter(name, pp, m, param):
    with pytest.raises(ScheduleError, match=rf"^{param}: "):
        build_schedule(name, pp, m)


def test_placement():
    s = build_schedule("1f1b", 4, 4)
    assert [s.stage_of(r, 0) for r in range(4)] == [0, 1, 2, 3]
    assert (s.prev_rank(0, 0), s.next_rank(0, 0), s.next_rank(3, 0)) == (None, 1, None)
    assert s.is_first_stage(0, 0) and s.is_last_stage(3, 0) and not s.is_last_stage(2, 0)

    d = build_schedule("dualpipe", 4, 8)
    assert [(d.stage_of(r, 0), d.stage_of(r, 1)) for r in range(4)] == [(0, 3), (1, 2), (2, 1), (3, 0)]
    assert (d.next_rank(1, 0), d.next_rank(1, 1), d.prev_rank(1, 1)) == (2, 0, 2)
    assert d.is_first_stage(3, 1) and d.is_last_stage(0, 1) and d.is_last_stage(3, 0)
    assert d.route(5) == [(3, 1), (2, 1), (1, 1), (0, 1)] and d.param_copies == 2

    v = build_schedule("dualpipev", 4, 8)
    assert [(v.stage_of(r, 0), v.stage_of(r, 1)) for r in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]
    assert v.next_rank(3, 0) == 3 and v.prev_rank(3, 1) == 3  # the turn of the V is local
    assert v.next_rank(2, 1) == 1 and v.is_last_stage(0, 1) and v.is_first_stage(0, 0)
    assert v.num_stages == 8 and v.param_copies == 1


HAND_WRITTEN = """
# a 2-rank 1F1B written by hand
name: hand
layout: linear
peak: 2 1
rank 0: F0.0 SEND_F0.0>1 F0.1 SEND_F0.1>1 RECV_B0.0<1 BW0.0 RECV_B0.1<1 BW0.1
rank 1: RECV_F0.0<0 F0.0 RECV_F0.1<0 BW0.0 SEND_B0.0>0 F0.1 BW0.1 SEND_B0.1>0
"""


def test_custom_schedule_file_loads(tmp_path):
    path = tmp_path / "hand.txt"
    path.write_text(HAND_WRITTEN)
    s = load_schedule(path)
    assert (s.name, s.pp, s.num_microbatches, s.claimed_peak_activations) == ("hand", 2, 2, [2, 1])
    assert str(s.actions[1][0]) == "RECV_F0.0<0"


def test_custom_schedule_file_with_automatic_transfers():
    text = "layout: v\ntransfers: auto\nrank 0: F0.0 F1.0 BW1.0 BW0.0\nrank 1: F0.0 F1.0 BW1.0 BW0.0\n"
    s = parse_schedule(text)
    assert s.num_stages == 4 and s.claimed_peak_activations == [2, 2]
    assert "SEND_F0.0>1" in map(str, s.actions[0]) and "RECV_B0.0<1" in map(str, s.actions[0])


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_file_format_round_trips(name):
    s = build_schedule(name, 4, 8)
    back = parse_schedule(format_schedule(s))
    assert back == s


@pytest.mark.parametrize(
    "text,match",
    [
        ("rank 0: F0.0\nrank 2: F0.0\n", "ranks must be 0..1"),
        ("rank 0: F0.0 X1\n", r"<schedule>:1: cannot parse action 'X1'"),
        ("speed: 3\nrank 0: F0.0 BW0.0\n", "unknown key 'speed'"),
        ("layout: zigzag\nrank 0: F0.0 BW0.0\n", "layout must be one of"),
        ("rank 0: F0.0\n", "B0.0 appears 0 times"),
    ],
)
def test_bad_schedule_files_rejected(text, match):
    with pytest.raises(ScheduleError, match=match):
        parse_schedule(text)


# ---- the validator rejects broken lists ---------------------------------------------------------------


def edited(schedule, rank, fn):
    lists = [list(acts) for acts in schedule.actions]
    lists[rank] = fn(lists[rank])
    return replace(schedule, actions=lists)


def test_rejects_missing_recv():
    s = build_schedule("1f1b", 4, 6)
    broken = edited(s, 2, lambda acts: [a for a in acts if str(a) != "RECV_F0.3<1"])
    with pytest.raises(ScheduleError, match=r"rank 2: expected exactly one RECV_F0.3<1"):
        validate(broken)


def test_rejects_w_before_b():
    s = build_schedule("zb1p", 4, 6)

    def swap(acts):
        i, j = acts.index(parse_action("B0.2")), acts.index(parse_action("W0.2"))
        acts[i], acts[j] = acts[j], acts[i]
        return acts

    with pytest.raises(ScheduleError, match=r"rank 1: W0.2 runs before B0.2"):
        validate(edited(s, 1, swap))


def test_rejects_deadlocking_order():
    """Rank 0 waits for a gradient before sending the activation that rank 1 needs to produce it."""
    s = build_schedule("1f1b", 2, 1)
    assert [str(a) for a in s.actions[0]] == ["F0.0", "SEND_F0.0>1", "RECV_B0.0<1", "BW0.0"]
    # Put the RECV of the gradient before the SEND of the activation: each rank blocks on the other.
    broken = edited(s, 0, lambda acts: [acts[0], acts[2], acts[1], acts[3]])
    with pytest.raises(
        ScheduleError, match=r"deadlock.*rank 0 blocked at RECV_B0.0<1.*rank 1 blocked at RECV_F0.0<0"
    ):
        validate(broken)


def test_rejects_crossed_transfers():
    """Two sends in one order on rank 0 and the matching receives in the other order on rank 1: every
    transfer has its partner, but NCCL (no tags, posting order per direction) would hand micro-batch
    1's activations to the receive of micro-batch 0, and blocking send/recv would deadlock."""
    s = build_schedule("1f1b", 2, 3)

    def swap_recvs(acts):
        i, j = acts.index(parse_action("RECV_F0.0<0")), acts.index(parse_action("RECV_F0.1<0"))
        acts[i], acts[j] = acts[j], acts[i]
        return acts

    with pytest.raises(
        ScheduleError,
        match=r"rank 0 -> rank 1: transfer #0 is SEND_F0.0>1 on rank 0 but RECV_F0.1<0 on rank 1; NCCL",
    ):
        validate(edited(s, 1, swap_recvs))


def test_receives_posted_ahead_are_legal_across_directions():
    """Each direction has its own stream (a process group per direction): a rank may post its
    receive from a neighbour before its send to that neighbour, as long as each direction's order
    agrees. Here both ranks of a 1F1B pp=2 list hold their receive first; the direction check
    accepts it, and only the blocking-rendezvous proof (which no runtime needs) refuses it."""
    s = build_schedule("1f1b", 2, 1)
    head_to_head = edited(s, 0, lambda acts: [acts[0], acts[2], acts[1], acts[3]])
    from moeforge.platform.schedules.validate import _check_direction_order

    _check_direction_order(head_to_head)  # per-direction order agrees: NCCL streams would not hang
    with pytest.raises(ScheduleError, match="deadlock"):
        validate(head_to_head)


def test_rejects_compute_before_its_input():
    s = build_schedule("1f1b", 2, 2)

    def f_first(acts):
        acts.remove(parse_action("RECV_F0.0<0"))
        acts.insert(1, parse_action("RECV_F0.0<0"))
        return acts

    with pytest.raises(ScheduleError, match=r"rank 1: F0.0 runs before its input arrives"):
        validate(edited(s, 1, f_first))


def test_rejects_duplicate_and_wrong_peer():
    s = build_schedule("1f1b", 3, 3)
    with pytest.raises(ScheduleError, match="F0.1 appears 2 times"):
        validate(edited(s, 0, lambda acts: acts + [parse_action("F0.1")]))
    wrong = edited(
        s, 0, lambda acts: [parse_action("SEND_F0.0>2") if str(a) == "SEND_F0.0>1" else a for a in acts]
    )
    with pytest.raises(ScheduleError, match="rank 0: expected exactly one SEND_F0.0>1"):
        validate(wrong)


def test_rejects_activation_claim_exceeded():
    s = build_schedule("dualpipe", 4, 8)
    with pytest.raises(
        ScheduleError, match=r"rank 0: .* brings live activations to 5, above the claimed peak 4"
    ):
        validate(replace(s, claimed_peak_activations=[4] * 4))


def test_rejects_wrong_direction_microbatch():
    s = build_schedule("dualpipe", 4, 8)
    with pytest.raises(ScheduleError, match="micro-batch 5 does not flow through chunk 0"):
        validate(edited(s, 0, lambda acts: acts + [parse_action("F0.5")]))


@pytest.mark.parametrize(("name", "pp", "m"), [("1f1b", 4, 8), ("zb1p", 2, 4), ("dualpipe", 4, 8), ("dualpipev", 2, 4)])
def test_forward_only_lists_follow_the_training_routes(name, pp, m):
    """Evaluation's lists: every micro-batch passes every (rank, chunk) of its training route once,
    forward only, and the lists are deadlock-free under blocking send/recv."""
    from moeforge.platform.schedules import forward_only

    train = build_schedule(name, pp, m)
    fwd = forward_only(train)
    validate(fwd)
    assert fwd.forward_only and fwd.layout == train.layout and fwd.num_microbatches == m
    assert all(a.kind in (Kind.F, Kind.SEND_F, Kind.RECV_F) for acts in fwd.actions for a in acts)
    for mb in range(m):
        passes = sorted((r, a.chunk) for r, acts in enumerate(fwd.actions) for a in acts
                        if a.kind is Kind.F and a.mb == mb)
        assert passes == sorted(train.route(mb))
    broken = replace(fwd, actions=[acts[::-1] for acts in fwd.actions])
    with pytest.raises(ScheduleError):  # consumers before producers: a blocking run cannot finish
        validate(broken)
