"""Machines with systemd as PID 1: no unit has failed (a service that crashed after the switch
started it, which switch-to-configuration's own check came too early to see)."""

import pytest

skips_acceptable = True  # a machine without systemd (a Mac, a namespace test machine) has none


def test_no_unit_failed(host):
    # sd_booted(): systemd as PID 1 makes this directory (sd_booted(3)).
    if not host.file("/run/systemd/system").is_directory:
        pytest.skip("no systemd as PID 1 on this machine")
    failed = host.check_output("systemctl list-units --state=failed --no-legend --plain")
    assert failed == "", f"failed units:\n{failed}"
