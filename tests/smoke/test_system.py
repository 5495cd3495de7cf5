"""Every machine: it runs the system its profile selects, and that system is whole."""


def test_runs_the_selected_generation(host):
    running = host.check_output("readlink -f /run/current-system")
    selected = host.check_output("readlink -f /nix/var/nix/profiles/system")
    assert running == selected
    assert running.startswith("/nix/store/")


def test_system_is_valid_in_the_store(host):
    assert host.run("nix-store --verify-path $(readlink -f /run/current-system)").rc == 0


def test_release_names_this_machine(host, machine):
    assert host.file("/etc/fleet-release").content_string.split()[0] == machine["name"]


def test_sources_are_in_place(host):
    assert host.file("/var/src/config/flake.nix").is_file
