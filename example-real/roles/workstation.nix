{ pkgs, ... }:
{
  programs.zsh.enable = true;
  environment.systemPackages = [ pkgs.jq ];
}
