"""Machines with a service: its process answers on the port the fleet file expects."""

import pytest

roles = {"web", "db", "vpn"}
skips_acceptable = True  # a machine of these roles may have no service_port


def test_service_answers(host, machine):
    port = machine.get("service_port")
    if port is None:
        pytest.skip("no service_port in the fleet file for this machine")
    address = machine.get("service_address", "127.0.0.1")
    assert host.socket(f"tcp://{address}:{port}").is_listening
    status = host.check_output(
        "python3 -c 'import urllib.request; "
        f'print(urllib.request.urlopen("http://{address}:{port}/").status)\''
    )
    assert status == "200"
