"""The test fleet: NixOS-like machines started as Linux namespaces on this one computer.

Each machine is a private mount, PID, UTS and IPC namespace whose PID 1 is ``testbed.machine``.
It has its own Nix store (``/nix``), its own ``/etc`` and ``/var`` (overlays on the real ones),
an empty ``/root``, fresh ``/run`` and ``/tmp``, a ``deploy`` user, a ``nix-daemon`` and an
sshd on ``127.0.0.1:<port>``. No container engine, VM or systemd is involved; root is needed.

A systemd machine (``"nix": "trixie"`` or ``"sid"`` or ``"systemd": true`` in the roster, or
``up --systemd NAMES``) is systemd as PID 1 of a Debian root of that suite with its Nix (2.26,
2.34) instead, booted by ``systemd-nspawn`` from ``testbed.nspawn`` on an overlay of a template
built once (``testbed.template``). The default roster mixes both kinds.

Usage, from the repository root::

    python -m testbed up [--machines N] [--roster example/hosts.json] [--systemd web1,db1]
    python -m testbed up --machines 30 [--light] --latency 50ms  # web3.., through relays
    python -m testbed ssh web1 hostname
    python -m testbed status             # name, port, up/down, /run/current-system
    python -m testbed reboot web1        # prints the new boot id
    python -m testbed down [--purge]

``--machines`` beyond the roster repeats its machines (web3, web4, db2, ..., the example
flake has configurations for them up to 60: ``example/lib/roster.nix``). ``--latency`` puts a
relay (``testbed.relay``) in front of each machine's sshd, on the machine's own loopback
address: SSH through it takes the given round trip, and it counts the bytes.

Machine ``i`` of the roster listens on ``$FLAKEFLEET_TESTBED_PORT + 1 + i`` (base 22400).
Everything lives in the state directory, ``$FLAKEFLEET_TESTBED_STATE`` (default ``.testbed/``):
``keys/id_ed25519`` (the client key), ``known_hosts``, ``ssh_config``, ``fleet.yaml`` (the
fleet file for flakefleet) and ``machines/<name>/`` (store, overlay layers, ``pid``,
``console.log``).

Inside a machine:

- ``/run/boot-id`` is a fresh UUID at every boot (the kernel's boot_id is shared by all).
- ``/var/lib/fake-bootloader/default`` is the bootloader: at boot, ``/run/booted-system`` and
  ``/run/current-system`` point to its target and its ``activate`` runs (``/var/log/boot.log``).
- sshd (``/etc/ssh/testbed/sshd_config``, rewritten by the testbed at each start) is restarted
  one second after it exits, so a configuration that breaks it does not end the machine.

A runner that lives in its own mount namespace sets ``$FLAKEFLEET_TESTBED_OUTER_PID`` to a PID
of the computer's own namespace; machines (re)started from there then enter it first.
"""
