# Builders for systems laid out like the real flake outputs, using only the host's /bin/sh and
# coreutils (Debian's Nix ships with `sandbox = false`), so they build with no nixpkgs.
{ system }:
let
  shell = name: env: script: derivation ({
    inherit name system;
    builder = "/bin/sh";
    args = [ "-c" script ];
    PATH = "/usr/bin:/bin";
  } // env);

  # Fill the @name@ placeholders of a script shipped beside this file.
  template = file: values:
    builtins.replaceStrings
      (map (key: "@${key}@") (builtins.attrNames values))
      (builtins.attrValues values)
      (builtins.readFile file);

  flag = value: if value then "1" else "";

  # Shared by every machine: the same store path everywhere, like nixpkgs' packages.
  sw = shell "fleet-sw-1.0" { } ''
    mkdir -p $out/bin
    printf '#!/bin/sh\necho "hello from the fleet"\n' > $out/bin/fleet-hello
    chmod +x $out/bin/fleet-hello
  '';

  # Incompressible filler to give a closure a chosen size (benchmarks).
  blob = size: shell "blob-${toString size}" { inherit size; } ''
    head -c "$size" /dev/urandom > $out
  '';

  # One long-running process per role, answering on the machine's port.
  services = host: {
    web = ''
      dir=/var/src/web-app-dist
      [ -d "$dir" ] || dir=/etc/static/www
      exec /usr/bin/python3 -m http.server ${toString host.port} --bind ${host.name} --directory "$dir"
    '';
    db = ''
      mkdir -p /var/lib/db && echo "${host.name} accepting connections" > /var/lib/db/status
      exec /usr/bin/python3 -m http.server ${toString host.port} --bind ${host.name} --directory /var/lib/db
    '';
    vpn = ''
      exec /usr/bin/python3 -m http.server ${toString host.port} --bind ${host.name} --directory /etc/static/vpn
    '';
  };
  # Shared by every home: the user's packages, like home-manager's home-path.
  homePath = shell "home-manager-path" { } ''
    mkdir -p $out/bin
    printf '#!/bin/sh\necho "hello from home-manager"\n' > $out/bin/home-hello
    chmod +x $out/bin/home-hello
  '';
in
{
  # nix-darwin's darwinConfigurations.<host>.system: a toplevel with `activate` (run as root
  # by darwin-rebuild; it links /run/current-system), `activate-user`, `sw`, `etc`,
  # `darwin-version` and `systemConfig`.
  darwinSystem = host:
    let
      version = host.version or "1";
      etc = shell "darwin-etc-${host.name}" {
        release = "${host.name} ${version}\n";
      } ''
        mkdir -p $out/etc
        printf '%s' "$release" > $out/etc/fleet-release
      '';
      toplevel = shell "darwin-system-${host.name}-${version}" {
        inherit etc sw version;
        blob = if host ? blobSize then blob host.blobSize else "";
        activate = template ./darwin-activate.sh {
          out = builtins.placeholder "out";
          name = host.name;
          failActivation = flag (host.failActivation or false);
        };
      } ''
        mkdir -p $out
        ln -s $etc/etc $out/etc
        ln -s $sw $out/sw
        [ -z "$blob" ] || ln -s $blob $out/blob
        printf '%s' "$activate" > $out/activate
        printf '#!/bin/sh\n# nix-darwin keeps this for older generations; it does nothing now.\n' \
          > $out/activate-user
        chmod +x $out/activate $out/activate-user
        printf '%s' "${host.name}-$version" > $out/darwin-version
        printf '%s' "$out" > $out/systemConfig
      '';
    in
    { system = toplevel; };

  # home-manager's homeConfigurations."<user>@<host>".activationPackage: a
  # home-manager-generation with `activate` (run as the user), `home-files` and `home-path`.
  homeConfiguration = host:
    let
      version = host.version or "1";
      files = shell "home-manager-files" {
        profile = "# ${host.user}@${host.name} ${version} (managed by flakefleet)\n";
      } ''
        mkdir -p $out/.config/fleet
        printf '%s' "$profile" > $out/.fleet-profile
        printf '%s\n' "${version}" > $out/.config/fleet/version
      '';
      generation = shell "home-manager-generation" {
        inherit files;
        home = homePath;
        blob = if host ? blobSize then blob host.blobSize else "";
        activate = template ./home-activate.sh {
          out = builtins.placeholder "out";
          user = host.user;
          failActivation = flag (host.failActivation or false);
        };
      } ''
        mkdir -p $out
        ln -s $files $out/home-files
        ln -s $home $out/home-path
        [ -z "$blob" ] || ln -s $blob $out/blob
        printf '%s' "$activate" > $out/activate
        chmod +x $out/activate
      '';
    in
    { activationPackage = generation; };

  nixosSystem = host:
    let
      version = host.version or "1";
      roles = host.roles or [ ];
      etc = shell "etc-${host.name}" {
        release = "${host.name} ${version}\n";
        motd = "${host.name}: ${builtins.concatStringsSep ", " roles} (managed by flakefleet)\n";
        page = "<html><body><h1>${host.name}</h1><p>version ${version}</p></body></html>\n";
        peers = host.peers or "";  # the other machines' WireGuard public keys (generated vars)
      } ''
        mkdir -p $out/www $out/vpn
        printf '%s' "$release" > $out/fleet-release
        printf '%s' "$motd" > $out/motd
        printf '%s' "$page" > $out/www/index.html
        printf 'peers: 0\n' > $out/vpn/status
        printf '%s' "$peers" > $out/vpn/peers
      '';
      roleServices = builtins.filter (role: (services host) ? ${role}) roles;
      serviceEnv = builtins.listToAttrs (map
        (role: { name = "service_${role}"; value = "#!/bin/sh\n" + (services host).${role}; })
        roleServices);
      values = {
        out = builtins.placeholder "out";
        name = host.name;
        failActivation = flag (host.failActivation or false);
        breakSsh = flag (host.breakSsh or false);
        activationDelay = toString (host.activationDelay or "");
        # users.users: accounts the activation creates (NixOS's update-users-groups.pl).
        users = builtins.concatStringsSep " " (host.users or [ ]);
      };
      toplevel = shell "nixos-system-${host.name}-${version}" ({
        inherit etc sw version;
        kernelVersion = host.kernel or "6.6.1";
        # A container (boot.isContainer) has no kernel, initrd nor kernel modules.
        container = flag (host.container or false);
        # What the running init speaks; switch-to-configuration exits 100 when it changes.
        initInterface = host.initInterfaceVersion or "systemd 2";
        serviceNames = builtins.concatStringsSep " " roleServices;
        blob = if host ? blobSize then blob host.blobSize else "";
        activate = template ./activate.sh values;
        switch = template ./switch-to-configuration.sh values;
      } // serviceEnv) ''
        mkdir -p $out/bin $out/services
        ln -s $etc $out/etc
        ln -s $sw $out/sw
        [ -z "$blob" ] || ln -s $blob $out/blob
        printf '%s' "$version" > $out/nixos-version
        printf '%s\n' "$initInterface" > $out/init-interface-version
        if [ -z "$container" ]; then
          mkdir -p $out/kernel-modules
          printf 'imitation kernel %s\n' "$kernelVersion" > $out/kernel
          printf 'imitation initrd %s\n' "$kernelVersion" > $out/initrd
          printf '%s\n' "$kernelVersion" > $out/kernel-modules/version
        fi
        printf '%s' "$activate" > $out/activate
        printf '%s' "$switch" > $out/bin/switch-to-configuration
        chmod +x $out/activate $out/bin/switch-to-configuration
        for service in $serviceNames; do
          eval "printf '%s' \"\$service_$service\"" > $out/services/$service
          chmod +x $out/services/$service
        done
      '';
    in
    {
      config.system.build = { inherit toplevel; };
    };
}
