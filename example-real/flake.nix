# A fleet flake shaped like the seeds' (an mkHost helper with per-host meta, per-host
# directories, roles; home-manager as a NixOS module and standalone; nix-darwin), on the real
# nixpkgs, home-manager and nix-darwin of 2020. It is not the demo's flake: nothing of it builds
# offline (the first derivation needs nixpkgs' bootstrap tools from the internet), but every
# machine evaluates, so deploy/plan.py and deploy/build.py --dry can say what would change.
#
# Its inputs are written as a real fleet writes them; lock them against the trees in
# ../shared/fixtures/real-nix-2020.tar.xz (unpacked to $TREES) without the network:
#   nix flake lock --override-input nixpkgs path:$TREES/nixpkgs \
#     --override-input home-manager path:$TREES/home-manager \
#     --override-input darwin path:$TREES/nix-darwin
{
  description = "flakefleet: a real NixOS, nix-darwin and home-manager fleet (evaluation only)";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/28fce082c8ca1a8fb3dfac5c938829e51fb314c8";
    home-manager = {
      url = "github:nix-community/home-manager/release-20.09";
      inputs.nixpkgs.follows = "nixpkgs";
    };
    darwin = {
      url = "github:LnL7/nix-darwin";
      inputs.nixpkgs.follows = "nixpkgs";
    };
  };

  outputs = { self, nixpkgs, home-manager, darwin }@inputs:
    let
      fleet = import ./lib { inherit inputs; };
      hosts = import ./hosts.nix;
    in
    {
      nixosConfigurations = fleet.nixosHosts hosts;
      darwinConfigurations = fleet.darwinHosts hosts;
      homeConfigurations = fleet.homes hosts;
    };
}
