"""What changes a machine: pyinfra operations for sources, systems and verification."""
