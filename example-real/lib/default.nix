# mkHost and friends (seed 004's lib/default.nix): every host gets its meta and the flake's
# inputs as module arguments, its own directory, the base module and its roles' modules.
{ inputs }:
let
  inherit (inputs) nixpkgs home-manager darwin;
  lib = nixpkgs.lib;

  metaOf = name: host: {
    hostname = name;
    stateVersion = "20.09";
    users = [ ];
    roles = host.roles or [ ];
  } // (host.meta or { });

  ofClass = class: hosts: lib.filterAttrs (name: host: host.class == class) hosts;

  roleModules = meta: map (role: ../roles + "/${role}.nix") meta.roles;

  mkHost = name: host:
    let meta = metaOf name host; in
    nixpkgs.lib.nixosSystem {
      system = host.system or "x86_64-linux";
      specialArgs = { inherit inputs meta; };
      modules = [
        ../hosts/base.nix
        (../hosts + "/${host.dir or name}")
        home-manager.nixosModules.home-manager
        ../home/users.nix
      ] ++ roleModules meta;
    };

  mkDarwin = name: host:
    let meta = metaOf name host; in
    darwin.lib.darwinSystem {
      specialArgs = { inherit meta; };
      modules = [ (../hosts + "/${name}") ] ++ roleModules meta;
    };

  mkHome = name: host:
    home-manager.lib.homeManagerConfiguration {
      system = host.system or "x86_64-linux";
      username = host.user;
      homeDirectory = "/home/${host.user}";
      configuration = ../home/common.nix;
    };
in
{
  nixosHosts = hosts: lib.mapAttrs mkHost (ofClass "nixos" hosts);
  darwinHosts = hosts: lib.mapAttrs mkDarwin (ofClass "darwin" hosts);
  homes = hosts: lib.mapAttrs' (name: host: lib.nameValuePair "${host.user}@${name}" (mkHome name host))
    (ofClass "home" hosts);
}
