"""Machines with a service: its process answers on the port the fleet file expects."""

import pytest

from flakefleet.checks import TIMEOUT

roles = {"web", "db", "vpn"}
skips_acceptable = True  # a machine of these roles may have no service_port


def test_service_answers(host, machine):
    port = machine.get("service_port")
    if port is None:
        pytest.skip("no service_port in the fleet file for this machine")
    address = machine.get("service_address", "127.0.0.1")
    assert host.socket(f"tcp://{address}:{port}").is_listening
    # curl, not python3: every NixOS system has curl (environment.corePackages) and none has
    # python3 unless it installs it; macOS ships /usr/bin/curl.
    status = host.check_output(
        f"curl --silent --max-time {TIMEOUT} --output /dev/null --write-out '%{{http_code}}' "
        f"http://{address}:{port}/"
    )
    assert status == "200"
