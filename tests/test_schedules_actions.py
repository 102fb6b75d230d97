"""Action vocabulary: string forms round-trip, bad strings and bad actions are rejected."""

import pytest
from moeforge.platform.schedules import Action, Kind, ScheduleError, build_schedule, parse_action

FORMS = [
    "F0.3",
    "B1.5",
    "W0.2",
    "BW0.4",
    "F0.6&B1.2",
    "F0.6&BW1.2",
    "SEND_F0.3>2",
    "RECV_B1.5<3",
    "SEND_B1.15>0",
    "RECV_F0.12<11",
]


@pytest.mark.parametrize("text", FORMS)
def test_string_form_round_trips(text):
    action = parse_action(text)
    assert str(action) == text
    assert parse_action(str(action)) == action


def test_parsed_fields():
    fb = parse_action("F0.6&B1.2")
    assert (fb.kind, fb.chunk, fb.mb, fb.b_chunk, fb.b_mb, fb.b_kind) == (Kind.FB, 0, 6, 1, 2, Kind.B)
    assert fb.forward_half == Action(Kind.F, 0, 6)
    assert fb.backward_half == Action(Kind.B, 1, 2)
    send = parse_action("SEND_F0.3>2")
    assert (send.kind, send.chunk, send.mb, send.peer) == (Kind.SEND_F, 0, 3, 2)
    assert parse_action("BW0.4").kind is Kind.BW  # not read as B followed by junk
    assert str(Action(Kind.FB, 0, 6, b_chunk=1, b_mb=2)) == "F0.6&B1.2"  # FB defaults to a split half


@pytest.mark.parametrize(
    "text", ["F0", "X0.1", "F0.1>2", "SEND_F0.1<2", "RECV_B0.1", "B0.1&F1.2", "F-1.2", ""]
)
def test_bad_strings_rejected(text):
    with pytest.raises(ScheduleError):
        parse_action(text)


def test_bad_actions_rejected():
    with pytest.raises(ScheduleError, match="peer"):
        Action(Kind.SEND_F, 0, 1)
    with pytest.raises(ScheduleError, match="b_chunk"):
        Action(Kind.FB, 0, 1)
    with pytest.raises(ScheduleError, match="only for FB"):
        Action(Kind.F, 0, 1, b_chunk=0)


def test_every_generated_action_round_trips():
    schedule = build_schedule("1f1b", 4, 6)
    for acts in schedule.actions:
        for action in acts:
            assert parse_action(str(action)) == action
