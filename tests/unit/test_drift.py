"""deploy/plan.py's verdicts and drift, from a machine's state and its new system."""

from flakefleet.drift import Assessment, assess, name_of, render
from flakefleet.models import Generation, MachineState

ONE = "/nix/store/aaaa-nixos-system-web1-1"
TWO = "/nix/store/bbbb-nixos-system-web1-2"
HAND = "/nix/store/cccc-nixos-system-web1-hand"


def state(current, profile, *generations: tuple[int, str, bool]) -> MachineState:
    return MachineState(
        current_system=current,
        profile_system=profile,
        generations=[Generation(n, "2026-11-30 05:00:00", c, s) for n, s, c in generations],
    )


def test_verdicts():
    assert assess(state(ONE, ONE, (1, ONE, True)), ONE) == Assessment("up to date")
    assert assess(state(ONE, ONE, (1, ONE, True)), TWO) == Assessment(
        "would switch", "nixos-system-web1-1 → nixos-system-web1-2"
    )
    assert assess(state(None, None), ONE).change == "nothing → nixos-system-web1-1"
    selected = assess(state(TWO, ONE, (1, ONE, True), (2, TWO, False)), TWO)
    assert (selected.verdict, selected.change) == (
        "would select",
        "boots nixos-system-web1-1, would boot nixos-system-web1-2",
    )


def test_drift_rolled_back_booting_another_and_set_by_hand():
    rolled_back = assess(state(ONE, ONE, (1, ONE, True), (2, TWO, False)), ONE)
    assert rolled_back.drift == [
        "its profile selects generation 1, not the newest (2): rolled back"
    ]
    assert not rolled_back.up_to_date
    by_hand = assess(state(HAND, ONE, (1, ONE, True)), ONE).drift
    assert by_hand == [
        "runs nixos-system-web1-hand but would boot nixos-system-web1-1",
        "runs nixos-system-web1-hand, which no generation holds: set by hand?",
    ]
    # Generations whose systems could not be read say nothing about a system set by hand.
    assert assess(state(HAND, HAND, (1, None, True)), HAND).drift == []


def test_render_lines():
    lines = render("web1", assess(state(ONE, ONE, (1, ONE, True)), TWO), ["blob: 1 → 2"], 6)
    assert lines == [
        "web1    would switch  nixos-system-web1-1 → nixos-system-web1-2",
        "        blob: 1 → 2",
    ]
    assert name_of(None) == "nothing"
