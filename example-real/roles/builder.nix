{ ... }:
{
  nix.maxJobs = 8;
  nix.extraOptions = "keep-outputs = true";
}
