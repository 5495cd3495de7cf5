# What every NixOS host has, from its meta.
{ meta, lib, ... }:
{
  networking.hostName = meta.hostname;
  system.stateVersion = meta.stateVersion;
  services.openssh.enable = true;
  users.users = lib.genAttrs meta.users (user: { isNormalUser = true; extraGroups = [ "wheel" ]; });
  nix.trustedUsers = [ "root" "@wheel" ];
}
