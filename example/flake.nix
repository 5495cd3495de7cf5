# The example fleet. It imitates NixOS so the whole deploy pipeline can run on a machine with
# no nixpkgs and no network: every system is a plain derivation built with the host's /bin/sh,
# laid out like a NixOS toplevel (bin/switch-to-configuration, activate, nixos-version, etc, sw,
# kernel, initrd). A darwin machine gets darwinConfigurations.<machine>.system (nix-darwin's
# layout) and a home-manager-only machine homeConfigurations."<user>@<machine>".activationPackage.
# A real fleet's flake plugs in unchanged: flakefleet reads only those attributes.
{
  description = "flakefleet example fleet (NixOS imitation, builds offline)";

  outputs = { self }:
    let
      roster = {
        hosts = builtins.fromJSON (builtins.readFile ./hosts.json);
      };
      # hosts.json's machines, then copies of them (web3, db2, ...) up to 60 machines, named as
      # `python -m testbed up --machines N` names them (lib/roster.nix).
      hosts = import ./lib/roster.nix 60 roster.hosts;
      imitation = import ./lib/imitation.nix { system = "x86_64-linux"; };
      ofClass = class: builtins.filter (name: hosts.${name}.class == class) (builtins.attrNames hosts);
      # Generated vars (flakefleet's `generators`, clan's model) keep public files in vars/:
      # each machine's config lists the other machines' WireGuard public keys, as a peer list.
      publicVar = name: file:
        let path = ./. + "/vars/${name}/${file}"; in
        if builtins.pathExists path then builtins.readFile path else "";
      peers = self: builtins.concatStringsSep "" (map (name: publicVar name "wireguard/public")
        (builtins.filter (name: name != self) (builtins.attrNames hosts)));
      configurations = class: make: builtins.listToAttrs (map
        (name: { inherit name; value = make (hosts.${name} // { inherit name; peers = peers name; }); })
        (ofClass class));
    in
    {
      nixosConfigurations = configurations "nixos" imitation.nixosSystem;
      darwinConfigurations = configurations "darwin" imitation.darwinSystem;
      homeConfigurations = builtins.listToAttrs (map
        (name: let host = hosts.${name} // { inherit name; }; in {
          name = "${host.user}@${name}";
          value = imitation.homeConfiguration host;
        })
        (ofClass "home"));
    };
}
