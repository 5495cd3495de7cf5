# web1's own settings: its disks and boot loader (hardware-configuration.nix on a real host).
{ ... }:
{
  fileSystems."/" = { device = "/dev/disk/by-label/nixos"; fsType = "ext4"; };
  boot.loader.grub.device = "/dev/sda";
}
