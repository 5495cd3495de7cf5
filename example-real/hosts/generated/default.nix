# A generated host's own settings (hosts.nix): its disks and boot loader.
{ meta, ... }:
{
  fileSystems."/" = { device = "/dev/disk/by-label/${meta.hostname}"; fsType = "ext4"; };
  boot.loader.grub.device = "/dev/vda";
}
