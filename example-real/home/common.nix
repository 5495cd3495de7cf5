# Every user's home-manager configuration, standalone (home1) or as a NixOS module.
{ ... }:
{
  home.stateVersion = "20.09";
  manual.manpages.enable = false; # it would fetch a documentation tool while evaluating
  programs.git.enable = true;
  programs.bash.enable = true;
}
