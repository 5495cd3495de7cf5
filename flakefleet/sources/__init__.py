"""Sources for /var/src: declarations, their checks, content digests and the local build stage.

A machine's sources come from pyinfra data, key ``sources``, a mapping of names to sources::

    sources = {
        "nixpkgs": {"type": "git", "url": "https://github.com/NixOS/nixpkgs", "ref": "nixos-24.05"},
        "config-machine": {"type": "file", "path": "config/machines/{machine}"},
        "web-app-dist": {"type": "file", "build": {...}},
    }

The layers are read lowest first, as pyinfra orders data: ``group_data/all.py``, then each
group of the machine (``group_data/<class or role>.py``), then the fleet file, then ``--data``.
An entry merges field by field into the same name from a lower layer (unless it changes the
type, which replaces it), and ``None`` removes the name. ``{machine}`` in any string is the
machine's name. The flake is always the source ``config``.

Everything that can be checked on the controller is checked for every selected machine before
anything is copied: a bad declaration raises `SourcesInvalid`, one line per problem naming the
machine, the source and where it was declared.
"""

from flakefleet.sources.build import BuildStage
from flakefleet.sources.declarations import config_layer, merge, parse
from flakefleet.sources.digests import filter_options, list_tree, only_rules, tree_digest
from flakefleet.sources.git import GitCache, GitError
from flakefleet.sources.model import (
    CONFIG,
    STATE_DIR,
    Build,
    BuildError,
    Source,
    SourceError,
    SourcesInvalid,
)
from flakefleet.sources.run import MachineSources, Ready, RunSources, check_run

__all__ = [
    "CONFIG",
    "STATE_DIR",
    "Build",
    "BuildError",
    "BuildStage",
    "GitCache",
    "GitError",
    "MachineSources",
    "Ready",
    "RunSources",
    "Source",
    "SourceError",
    "SourcesInvalid",
    "check_run",
    "config_layer",
    "filter_options",
    "list_tree",
    "merge",
    "only_rules",
    "parse",
    "tree_digest",
]
