"""Settings for every machine.

The commented lines show each setting with its default (the defaults themselves live in one
place, `flakefleet.settings.MachineSettings`). Set one here, per group
(`group_data/<role or class>.py`), per machine (`data:` in the fleet file) or per run
(`pyinfra inventory.py deploy/site.py --data goal=boot`).
"""

# The flake that describes the fleet: a local directory, relative to the repository root.
# It must have nixosConfigurations.<machine> for every NixOS machine.
flake = "example"

# The goal (switch, boot, test, dry-activate, build) comes from the deploy file you run:
# deploy/site.py and deploy/switch.py switch, deploy/boot.py boots, and so on.

# Seconds a switched machine waits for the deployer's confirmation, made over a new SSH
# connection after the health checks pass, before it rolls itself back (0: no confirmation).
# confirm_timeout = 30

# What a failed health check does to a machine just activated: rollback, keep, or stop (roll
# back and activate no further machine in this run).
# on_check_failure = "rollback"

# Declared health checks besides tests/smoke/, e.g.
#   checks = [{"command": "systemctl is-active nginx", "timeout": 10},
#             {"http": "https://web1.example.org/health", "status": 200, "timeout": 5}]
# checks = []

# How many pytest processes at most run the smoke checks (tests/smoke/) side by side, each for
# its share of the machines: checks not yet recorded are round trips one after another, which
# more processes overlap; once every machine's are recorded (one batch a machine, all sent at
# once), one process checks them all, as more would only add their start-up.
# smoke_check_processes = 2

# Whether a machine the run did not change is checked too (smoke suites and `checks`). False
# makes a redeploy that changes nothing cost one round trip a machine and no pytest; the
# summary then says which machines went unchecked.
# check_unchanged = True

# Reboot after activating: never, when-needed (kernel, initrd or modules changed, or a boot
# goal), or always; the machine must come back on the new system within reboot_timeout seconds.
# reboot = "never"
# reboot_timeout = 300
# reboot_command = "reboot"

# Extra Nix settings for the controller's Nix commands, as `--option NAME VALUE`
# (the test fleet sets `substituters: ""` because this machine is offline).
# nix_options = {}
# A value may be read from a command instead (given to Nix in NIX_CONFIG, never on a command
# line nor in any output), e.g. a forge token:
#   nix_options = {"access-tokens": {"command": "pass show forge/token"}}

# Inputs of the flake replaced for this run only (`--override-input NAME REF`; flake.lock stays
# as it is), e.g. --data override_inputs='{"my-service": "../my-service"}'.
# override_inputs = {}

# The machine's name in the flake when it is not its fleet name (per machine in the fleet
# file), e.g. flake_attribute = "devmac" for darwinConfigurations.devmac.
# flake_attribute = None

# Evaluation (flakefleet.evaluation): each `nix eval` takes at most eval_chunk machines, and at
# most eval_workers run at once (default: the controller's cores, as far as its memory allows
# about 1 GiB per machine of a chunk; a real NixOS machine takes about 600 MiB), so memory does
# not grow with the fleet. A machine whose flake files, lock file, input overrides, Nix settings
# and attribute are unchanged since its last evaluation reuses it (.flakefleet/evaluations/);
# eval_cache = False evaluates every machine every time. The run takes the first machine's.
# eval_workers = None
# eval_chunk = 1
# eval_cache = True

# Free per-host data (e.g. {"stateVersion": "24.05", "users": ["alice"]}) for smoke checks
# (machine["meta"]) and deploy files (host.data.meta); the flake cannot read it.
# meta = {}

# Where each machine's system is built: "local" (this controller, one build for all machines),
# "target" (the machine builds it from /var/src/config), or a builder: a fleet machine's name
# or an ssh:// / ssh-ng:// URL (one build there for all its machines; it then sends each
# machine its closure itself, so it must be able to ssh to them, as a Nix remote builder does).
# build_on = "local"

# How closures travel to a machine: "ssh" (nix-store --serve) or "ssh-ng" (the Nix daemon
# protocol, which checks signatures); copy_compress compresses the SSH stream;
# substitute_on_destination lets the machine take paths from its own substituters first.
# copy_protocol = "ssh"
# copy_compress = False
# substitute_on_destination = False

# Closures are signed with the fleet's key before they leave the controller; machines list its
# public half (<key>.pub) in trusted-public-keys. Made on first use; sign_closures = False
# copies unsigned instead (ssh-ng copies then pass --no-check-sigs: trusted users only).
# signing_key = ".flakefleet/keys/signing.sec"
# sign_closures = True

# Fan-out for large fleets: upload each closure once to a binary cache and let every machine
# fetch from it, instead of one upload per machine, e.g.
#   cache = {"store": "file://.flakefleet/cache", "url": "http://10.0.0.5:8370", "serve": True}
#   cache = {"machine": "build1"}
# cache = None

# Gate: `nix flake check --no-build` of the flake before any machine is contacted; a failure
# stops the whole run with its error.
# flake_check = False

# Waves: a canary (role, class, glob or count), then batches (a count or "25%"); a wave with
# more than max_failures failed machines stops the rollout (flakefleet/rollout.py), e.g.
#   rollout = {"canary": "db", "batch": "25%", "max_failures": 1}
# rollout = None

# How many generations a machine keeps (the one it runs always stays); older ones are deleted
# and their store paths collected after the deploy. None keeps them all.
# keep_generations = None

# Where Nix is on machines whose SSH sessions lack it on PATH (group_data/darwin.py sets it).
# remote_nix_dir = None

# Sources for /var/src besides the flake (always `config`), krops' layout: name -> source, e.g.
#   sources = {
#       "nixpkgs": {"type": "git", "url": "https://github.com/NixOS/nixpkgs", "ref": "nixos-24.05"},
#       "config-machine": {"type": "file", "path": "machines/{machine}"},
#   }
# Groups (group_data/<role>.py), the fleet file and --data add to them or override them by name
# (field by field; None removes one). README.md "Sources" has every type and field.
# sources = {}
# Keep sources that are no longer declared in /var/src (by default they are removed).
# sources_keep_undeclared = False
# Take over a /var/src that holds files but not flakefleet's marker, moving aside any entry
# flakefleet did not make that has a declared source's name (only for a first deploy).
# sources_force = False
# Rebuild every source's tree even if its digest is unchanged (puts back files changed on the
# machine; a one-off repair, e.g. --data sources_resync=true).
# sources_resync = False
# Extra rsync options for the sources' transfers, e.g. ["--compress", "--bwlimit=5000"].
# sources_rsync_options = []

# Keys: secrets uploaded out of band (never through a Nix store), colmena's deployment.keys:
# name -> key, e.g.
#   keys = {
#       "db-password": {"age_file": "secrets/db-password.age", "owner": "postgres"},
#       "api-token": {"command": "pass show fleet/api-token", "mode": "0440", "group": "web"},
#   }
# Fields: age_file or command (the content), destination (/run/keys/<name>), owner (root),
# group (root; wheel on darwin), mode ("0400"), upload ("pre-activation" or "post-activation").
# Merged by name like sources; README.md "Keys" says more.
# keys = {}
# The operator's age identity file that decrypts the keys' age files (relative to the
# repository; ~ is the home directory).
# age_identity = None

# Machine identities (agenix, sops-nix): each machine's SSH host key and the admins' age keys,
# which age files (relative to the rules file) which machines and roles may read, and a
# .sops.yaml to write creation rules into (None: none). deploy/recipients.py updates them.
# recipients_file = "secrets/recipients.yaml"
# secrets_rules = "secrets/rules.yaml"
# sops_config = None

# Generated vars (clan's model): name -> generator, e.g.
#   generators = {"api-token": {"files": {"token": {}}, "share": True,
#                               "script": "openssl rand -hex 16 > $out/token"}}
# Fields: files (name -> {"secret": True or False}), script, prompts, dependencies, share.
# README.md "Generated vars" says more.
# generators = {}
# Where they are kept (None: the flake's vars/), and which to run again (with what depends on
# them), e.g. --data 'regenerate=["wireguard"]'.
# vars_dir = None
# regenerate = []
