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

  # `buildGate` (tests): the system's build says it started (`<gate>.waiting`), then waits
  # for the file `<gate>`, so a test can act while a deploy is between its preflight and its
  # first change. Absent unless given, so the other systems stay as they were.
  gate = host: if host ? buildGate then ''
    touch ${host.buildGate}.waiting
    while [ ! -e ${host.buildGate} ]; do sleep 0.1; done
  '' else "";

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

  # One long-running process per role, answering on the machine's port. `failService` makes
  # it crash a moment after it started (after switch-to-configuration's own check of the units
  # it started: only the health checks can see it).
  # A machine's second role service answers on port + 1, and so on.
  services = host:
    let
      withServices = builtins.filter (role: (roleScripts host 0) ? ${role}) (host.roles or [ ]);
      indexes = builtins.genList (i: i) (builtins.length withServices);
      portOf = role:
        host.port + builtins.head (builtins.filter (i: builtins.elemAt withServices i == role) indexes);
      ordered = role: roleScripts host (portOf role);
    in
    builtins.mapAttrs
    (role: script: if host.failService or false then ''
      echo "${role}: crashing (failService is set for ${host.name})" >&2
      sleep 1
      exit 1
    '' else script)
    (builtins.listToAttrs (map (role: { name = role; value = (ordered role).${role}; }) withServices));
  roleScripts = host: port: {
    web = ''
      dir=/var/src/web-app-dist
      [ -d "$dir" ] || dir=/etc/static/www
      exec /usr/bin/python3 -m http.server ${toString port} --bind ${host.name} --directory "$dir"
    '';
    db = ''
      mkdir -p /var/lib/db && echo "${host.name} accepting connections" > /var/lib/db/status
      exec /usr/bin/python3 -m http.server ${toString port} --bind ${host.name} --directory /var/lib/db
    '';
    vpn = ''
      exec /usr/bin/python3 -m http.server ${toString port} --bind ${host.name} --directory /etc/static/vpn
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
  # `darwin-version` and `systemConfig`. Since nix-darwin 25.05 `activate-user` is a stub marked
  # `# nix-darwin: deprecated`; `legacyActivateUser` makes a generation from before, whose
  # `activate-user` holds the checks and the user's part, run as the user.
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
          legacy = flag (host.legacyActivateUser or false);
        };
        activateUser =
          if host.legacyActivateUser or false then
            template ./darwin-activate-user.sh { out = builtins.placeholder "out"; }
          else
            "#!/bin/sh\n# nix-darwin: deprecated\n";
      } ''
        mkdir -p $out
        ln -s $etc/etc $out/etc
        ln -s $sw $out/sw
        [ -z "$blob" ] || ln -s $blob $out/blob
        printf '%s' "$activate" > $out/activate
        printf '%s' "$activateUser" > $out/activate-user
        chmod +x $out/activate $out/activate-user
        printf '%s' "${host.name}-$version" > $out/darwin-version
        printf '%s' "$out" > $out/systemConfig
      '';
    in
    { system = toplevel; };

  # home-manager's homeConfigurations."<user>@<host>".activationPackage: a
  # home-manager-generation with `activate` (run as the user), `home-files`, `home-path` and
  # `gen-version` (1: its activate leaves the profile to a caller that passes
  # `--driver-version 1`). `legacyHomeManager` makes one as home-manager made them before 25.11:
  # no `gen-version`, and an activate that always sets the profile itself.
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
        legacy = flag (host.legacyHomeManager or false);
        activate = template ./home-activate.sh {
          out = builtins.placeholder "out";
          user = host.user;
          failActivation = flag (host.failActivation or false);
          legacy = flag (host.legacyHomeManager or false);
        };
      } ''
        mkdir -p $out
        [ -n "$legacy" ] || echo 1 > $out/gen-version
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
      roleServices = builtins.filter (role: (services host) ? ${role}) roles;
      # On a machine with systemd, each role service is a unit, as NixOS's systemd.services
      # are: its script a store path of its own (the unit, and so the service, changes only when
      # the script does), wanted by multi-user.target.
      unitScript = role: shell "unit-script-fleet-${role}-start" {
        script = "#!/bin/sh\n" + (services host).${role};
      } ''
        printf '%s' "$script" > $out
        chmod +x $out
      '';
      unitFile = role: ''
        [Unit]
        Description=fleet ${role} service of ${host.name}
        After=network.target

        [Service]
        # NixOS gives each of its services a PATH of its own (systemd.services.<name>.path,
        # coreutils, findutils, grep, sed and systemd by default); units systemd starts without
        # one (systemd-run's) see only systemd's bin directory.
        Environment=PATH=/usr/bin:/usr/sbin
        ExecStart=${unitScript role}
        StandardOutput=append:/var/log/${role}.log
        StandardError=append:/var/log/${role}.log

        [Install]
        WantedBy=multi-user.target
      '';
      units = builtins.listToAttrs (map
        (role: { name = "unit_fleet_${role}"; value = unitFile role; })
        roleServices);
      # NixOS's sshd unit: stopIfChanged = false (restarted in one go, sessions kept, as
      # X-StopIfChanged=false tells switch-to-configuration). `sshdRevision` changes it, so the
      # switch restarts sshd; `breakSsh` moves it 1000 ports up (fault tests).
      sshDropIn = ''
        [Service]
        X-StopIfChanged=false
        Environment="FLEET_SSHD_REVISION=${toString (host.sshdRevision or "")}"
      '' + (if host.breakSsh or false then ''
        ExecStart=
        ExecStart=/bin/sh -c 'exec /usr/sbin/sshd -D -p $$(($$(sed -n "s/^Port //p" /etc/ssh/sshd_config.d/testbed.conf) + 1000))'
      '' else "");
      withSshDropIn = host ? sshdRevision || (host.breakSsh or false);
      etc = shell "etc-${host.name}" ({
        release = "${host.name} ${version}\n";
        motd = "${host.name}: ${builtins.concatStringsSep ", " roles} (managed by flakefleet)\n";
        page = "<html><body><h1>${host.name}</h1><p>version ${version}</p></body></html>\n";
        unitNames = builtins.concatStringsSep " " (map (role: "fleet_${role}") roleServices);
        sshDropIn = if withSshDropIn then sshDropIn else "";
        peers = host.peers or "";  # the other machines' WireGuard public keys (generated vars)
      } // units) ''
        mkdir -p $out/www $out/vpn $out/systemd/system/multi-user.target.wants
        printf '%s' "$release" > $out/fleet-release
        printf '%s' "$motd" > $out/motd
        printf '%s' "$page" > $out/www/index.html
        printf 'peers: 0\n' > $out/vpn/status
        for unit in $unitNames; do
          file=$(echo "$unit" | tr _ -).service
          eval "printf '%s' \"\$unit_$unit\"" > $out/systemd/system/$file
          ln -s ../$file $out/systemd/system/multi-user.target.wants/$file
        done
        if [ -n "$sshDropIn" ]; then
          mkdir -p $out/systemd/system/ssh.service.d
          printf '%s' "$sshDropIn" > $out/systemd/system/ssh.service.d/fleet.conf
        fi
        printf '%s' "$peers" > $out/vpn/peers
      '';
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
      # As in NixOS, the kernel, initrd and modules are store paths of their own, shared by
      # every generation with the same kernel: a switch that keeps them needs no reboot.
      kernelVersion = host.kernel or "6.6.1";
      kernel = shell "linux-${kernelVersion}" { inherit kernelVersion; } ''
        mkdir -p $out/lib/modules/$kernelVersion
        printf 'imitation kernel %s\n' "$kernelVersion" > $out/bzImage
        printf '%s\n' "$kernelVersion" > $out/lib/modules/$kernelVersion/version
      '';
      initrd = shell "initrd-linux-${kernelVersion}" { inherit kernelVersion; } ''
        mkdir -p $out
        printf 'imitation initrd %s\n' "$kernelVersion" > $out/initrd
      '';
      toplevel = shell "nixos-system-${host.name}-${version}" ({
        inherit etc sw version kernel initrd;
        # A container (boot.isContainer) has no kernel, initrd nor kernel modules.
        container = flag (host.container or false);
        # What the running init speaks; switch-to-configuration exits 100 when it changes.
        initInterface = host.initInterfaceVersion or "systemd 2";
        serviceNames = builtins.concatStringsSep " " roleServices;
        blob = if host ? blobSize then blob host.blobSize else "";
        activate = template ./activate.sh values;
        switch = template ./switch-to-configuration.sh values;
      } // serviceEnv
      # environment.systemPackages: store paths (a flake input's, a package's) in the system's
      # closure; absent unless given, so the other systems' paths stay as they were.
      // (if host ? packages then { packages = host.packages; } else { })) (gate host + ''
        mkdir -p $out/bin $out/services
        ln -s $etc $out/etc
        ln -s $sw $out/sw
        [ -z "$blob" ] || ln -s $blob $out/blob
        printf '%s' "$version" > $out/nixos-version
        printf '%s\n' "$initInterface" > $out/init-interface-version
        if [ -z "$container" ]; then
          ln -s $kernel/bzImage $out/kernel
          ln -s $initrd/initrd $out/initrd
          ln -s $kernel $out/kernel-modules
        fi
        printf '%s' "$activate" > $out/activate
        printf '%s' "$switch" > $out/bin/switch-to-configuration
        chmod +x $out/activate $out/bin/switch-to-configuration
        for service in $serviceNames; do
          eval "printf '%s' \"\$service_$service\"" > $out/services/$service
          chmod +x $out/services/$service
        done
      '' + (if host ? packages then ''
        mkdir -p $out/packages
        for package in $packages; do ln -s $package $out/packages/; done
      '' else ""));
    in
    {
      config.system.build = { inherit toplevel; };
    };
}
