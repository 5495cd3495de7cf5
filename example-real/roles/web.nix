{ meta, ... }:
{
  services.nginx = {
    enable = true;
    virtualHosts.${meta.hostname}.root = "/var/src/web-app-dist";
  };
  networking.firewall.allowedTCPPorts = [ 80 ];
}
