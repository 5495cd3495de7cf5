"""Machines with systemd as PID 1: no unit has failed (a service that crashed after the switch
started it, which switch-to-configuration's own check came too early to see).

A service that crashes a moment after it started is still "active" when the checks begin, so
the check first lets the youngest running service settle: it waits until every service has
been up for ``SETTLE`` seconds (systemd's own ActiveEnterTimestamp), then lists the failed
units. A machine whose services all started earlier (a no-op deploy) waits for nothing; the
units an SSH login itself starts (pam_systemd's user@UID.service and user-runtime-dir@UID.service,
the check's own login among them) are not waited for.
"""

import pytest

skips_acceptable = True  # a machine without systemd (a Mac, a namespace test machine) has none

SETTLE = 3  # seconds a service must stay up to count as started; systemd's restart delay is 0.1

# One command: sd_booted() (systemd as PID 1 makes /run/systemd/system, sd_booted(3)), the wait
# for the youngest service, and the failed units.
SETTLED_FAILED_UNITS = f"""
[ -d /run/systemd/system ] || {{ echo no-systemd; exit 0; }}
services=$(systemctl list-units --type=service --state=active --no-legend --plain | cut -d' ' -f1 \\
  | grep -v -e '^user@' -e '^user-runtime-dir@')
youngest=$(systemctl show --timestamp=unix --property=ActiveEnterTimestamp --value -- $services \\
  | sed -n 's/^@//p' | sort -n | tail -n 1)
wait=$(( ${{youngest:-0}} + {SETTLE} - $(date +%s) ))
[ "$wait" -le 0 ] || sleep "$wait"
systemctl list-units --state=failed --no-legend --plain
"""


def test_no_unit_failed(host):
    failed = host.check_output(SETTLED_FAILED_UNITS)
    if failed == "no-systemd":
        pytest.skip("no systemd as PID 1 on this machine")
    assert failed == "", f"failed units:\n{failed}"
