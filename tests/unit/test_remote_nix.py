"""The Nix command lines run on machines."""

import shlex

from flakefleet import remote_nix
from flakefleet.target import Target

NEW = "/nix/store/new-system"
WEB1 = Target.from_data("web1", {"ssh_hostname": "127.0.0.1", "ssh_user": "root"})
MAC1 = Target.from_data(
    "mac1",
    {"ssh_hostname": "127.0.0.1", "ssh_user": "deploy", "machine_class": "darwin",
     "remote_nix_dir": "/nix/bin"},
)  # fmt: skip


def test_commands_run_on_machines():
    fetch = shlex.split(remote_nix.fetch_command("http://127.0.0.1:8370", [NEW], WEB1))
    # The machine may have asked the cache before the upload: no remembered "absent".
    assert fetch[fetch.index("narinfo-cache-negative-ttl") + 1] == "0"
    assert fetch[-3:] == ["--from", "http://127.0.0.1:8370", NEW]
    assert "--no-check-sigs" in remote_nix.fetch_command("http://c", [NEW], WEB1, check_sigs=False)
    assert remote_nix.realise_command(["/nix/store/a.drv"], MAC1) == (
        "/nix/bin/nix-store --realise --keep-going /nix/store/a.drv"
    )
    relay = remote_nix.copy_command([NEW], "ssh://root@127.0.0.1", ["-p", "22401"], WEB1)
    assert relay.startswith("NIX_SSHOPTS='-p 22401' nix ")
    assert relay.endswith(f"copy --to ssh://root@127.0.0.1 {NEW}")
    build = remote_nix.build_command("/var/src/config", "web1", [["a", "b"]], WEB1)
    assert build.startswith("FLAKEFLEET_FLAKE=$(readlink -f /var/src/config) nix ")


def test_prune_command():
    assert remote_nix.prune_command(WEB1, 3) == (
        "nix-env --profile /nix/var/nix/profiles/system --delete-generations +3 && nix-store --gc"
    )
    assert remote_nix.prune_command(MAC1, 1).startswith(
        "/nix/bin/nix-env --profile /nix/var/nix/profiles/system"
    )
