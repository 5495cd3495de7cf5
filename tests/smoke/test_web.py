"""Web servers: the page they serve is this machine's."""

from flakefleet.checks import TIMEOUT

roles = {"web"}


def test_page_is_this_machines(host, machine):
    url = f"http://{machine.get('service_address', '127.0.0.1')}:{machine['service_port']}/"
    page = host.check_output(f"curl --silent --show-error --fail --max-time {TIMEOUT} {url}")
    assert machine["name"] in page
