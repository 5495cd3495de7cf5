"""A machine's status row (flakefleet.status), from its snapshot and deploy history."""

from __future__ import annotations

from flakefleet.models import Generation, MachineState
from flakefleet.records import parse_history
from flakefleet.status import render, status_of

OLD, NEW = "/nix/store/a-nixos-system-web1-1", "/nix/store/b-nixos-system-web1-2"
HISTORY = "\n".join(
    [
        '{"time":"t1","outcome":"succeeded","message":"m","goal":"switch","system":"' + OLD
        + '","generation":1,"sources":{},"run":"r1","by":"alice@laptop","revision":"abc12345f",'
        '"dirty":false}',
        "not json: a torn line is skipped",
        '{"time":"t2","outcome":"rolled-back","message":"m","goal":"switch","system":"' + NEW
        + '","generation":null,"sources":{},"run":"r2","by":"bob@ci","revision":"def",'
        '"dirty":true}',
    ]
)  # fmt: skip


def machine(current: str, profile: str) -> MachineState:
    return MachineState(
        current_system=current,
        profile_system=profile,
        generations=[Generation(1, "2026-12-01 05:00:00", profile == OLD, OLD),
                     Generation(2, "2026-12-01 06:00:00", profile == NEW, NEW)],
    )  # fmt: skip


def test_the_row_names_the_deploy_that_left_what_it_runs():
    row = status_of("web1", "nixos", ["web"], machine(OLD, OLD), parse_history(HISTORY),
                    None, False, NEW)  # fmt: skip
    assert (row.generation, row.since, row.revision, row.deployed_by) == (
        1, "2026-12-01 05:00:00", "abc12345f", "alice@laptop",
    )  # fmt: skip
    assert row.verdict == "would switch" and not row.reboot_pending
    assert row.drift == ("its profile selects generation 1, not the newest (2): rolled back",)
    (line, drift) = render(row, (8, 3))
    assert line.split() == ["web1", "nixos", "web", "would", "switch", "gen", "1,",
                            "2026-12-01", "05:00:00", "nixos-system-web1-1", "abc12345", "by",
                            "alice@laptop"]  # fmt: skip
    assert drift.strip().startswith("drift: its profile selects generation 1")


def test_a_boot_default_it_does_not_run_is_a_pending_reboot_and_units_are_listed():
    row = status_of("web1", "nixos", ["web"], machine(OLD, NEW), [], ["web.service"], False, NEW)
    assert row.reboot_pending and row.deployed_by is None
    line = render(row, (8, 3))[0]
    assert line.endswith("no deploy record  reboot pending  failed units: web.service")
