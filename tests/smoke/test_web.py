"""Web servers: the page they serve is this machine's."""

roles = {"web"}


def test_page_is_this_machines(host, machine):
    port = machine["service_port"]
    page = host.check_output(
        f"python3 -c 'import urllib.request; "
        f'print(urllib.request.urlopen("http://127.0.0.1:{port}/").read().decode())\''
    )
    assert machine["name"] in page
