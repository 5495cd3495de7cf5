# The Mac (seed 001's devmac): nix-darwin from its meta.
{ meta, pkgs, ... }:
{
  system.stateVersion = meta.stateVersion;
  networking.hostName = meta.hostname;
  services.nix-daemon.enable = true;
  environment.systemPackages = [ pkgs.git ];
}
