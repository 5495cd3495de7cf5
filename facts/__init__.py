"""What is true on a machine, read with pyinfra facts."""
