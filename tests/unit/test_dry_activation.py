"""What switch-to-configuration's dry-activate says, read back (flakefleet.services), on its
upstream wording (nixpkgs' switch-to-configuration-ng)."""

from flakefleet import services

UPSTREAM = """\
would stop the following units: accounts-daemon.service
would NOT stop the following changed units: sshd.service
would activate the configuration...
setting up /etc...
would restart systemd
would reload the following units: dbus.service
would restart the following units: nscd.service, polkit.service
would start the following units: accounts-daemon.service
"""


def test_every_kind_of_action_is_read_with_its_units():
    assert services.told(UPSTREAM.splitlines()) == {
        "stop": ["accounts-daemon.service"],
        "NOT stop": ["sshd.service"],
        "reload": ["dbus.service"],
        "restart": ["systemd", "nscd.service", "polkit.service"],
        "start": ["accounts-daemon.service"],
    }


def test_the_plan_line_lists_actions_in_the_switchs_order():
    told = services.told(UPSTREAM.splitlines())
    assert services.describe(told) == (
        "would stop accounts-daemon.service; keep running though changed sshd.service; "
        "reload dbus.service; restart systemd, nscd.service, polkit.service; "
        "start accounts-daemon.service"
    )
    assert services.describe(services.told(["would activate the configuration..."])) == (
        "none would stop, reload, restart or start"
    )
