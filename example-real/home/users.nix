# home-manager as a NixOS module: each of the host's meta.users gets home/common.nix.
{ meta, lib, ... }:
{
  home-manager.useGlobalPkgs = true;
  home-manager.users = lib.genAttrs meta.users (user: import ./common.nix);
}
