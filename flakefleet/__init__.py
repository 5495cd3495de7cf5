"""flakefleet: agentless push deployment of Nix fleets, built on pyinfra.

The library behind `facts/`, `operations/` and `deploy/`: the fleet file, the controller's
Nix and SSH commands, content digests and the run summary.
"""
