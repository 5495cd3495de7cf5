{ meta, ... }:
{
  services.prometheus = {
    enable = true;
    exporters.node.enable = true;
    scrapeConfigs = [{
      job_name = "node";
      static_configs = [{ targets = [ "${meta.hostname}:9100" ]; }];
    }];
  };
  networking.firewall.allowedTCPPorts = [ 9090 ];
}
