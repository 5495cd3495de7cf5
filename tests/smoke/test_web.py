"""Web servers: the page they serve is this machine's."""

roles = {"web"}


def test_page_is_this_machines(host, machine):
    url = f"http://{machine.get('service_address', '127.0.0.1')}:{machine['service_port']}/"
    fetch = f"import urllib.request; print(urllib.request.urlopen('{url}').read().decode())"
    page = host.check_output(f'python3 -c "{fetch}"')
    assert machine["name"] in page
