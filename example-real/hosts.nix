# The fleet: each host's class, platform, roles and meta (seed 004's `meta`: what every module
# of the host may read). A host's own settings are in hosts/<name>/; the generated ones (for
# measuring evaluation at fleet scale: bench/evaluation.py) share hosts/generated/.
let
  # 30 NixOS machines named by their first role and number (web-01, db-02, cache-03, ...), with
  # the roles' real services in turn: nginx, PostgreSQL, Redis, Prometheus with exporters.
  roleSets = [ [ "web" ] [ "db" ] [ "cache" "web" ] [ "monitor" ] [ "builder" ] [ "db" "monitor" ] ];
  pad = n: if n < 10 then "0${toString n}" else toString n;
  generated = n:
    let roles = builtins.elemAt roleSets (builtins.sub n 1 - 6 * ((n - 1) / 6)); in {
      name = "${builtins.head roles}-${pad n}";
      value = {
        class = "nixos";
        dir = "generated";
        inherit roles;
        meta = { users = [ "alice" ]; };
      };
    };
in
builtins.listToAttrs (builtins.genList (i: generated (i + 1)) 30) // {
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
