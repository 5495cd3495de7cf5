# The fleet: each host's class, platform, roles and meta (seed 004's `meta`: what every module
# of the host may read). A host's own settings are in hosts/<name>/.
{
  web1 = {
    class = "nixos";
    roles = [ "web" ];
    meta = { users = [ "alice" ]; };
  };
  db1 = {
    class = "nixos";
    roles = [ "db" ];
    meta = { users = [ "alice" "bob" ]; };
  };
  build1 = {
    class = "nixos";
    roles = [ "builder" ];
  };
  # Seed 001's Mac: deployed from darwinConfigurations.devmac, whatever its fleet name.
  devmac = {
    class = "darwin";
    system = "x86_64-darwin";
    roles = [ "workstation" ];
    meta = { users = [ "alice" ]; stateVersion = 4; };
  };
  # A home-manager-only machine: homeConfigurations."deploy@home1".
  home1 = {
    class = "home";
    user = "deploy";
  };
}
