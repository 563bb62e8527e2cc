"""Volumes at boot: attach, restore, format safely, mount, grow, and clean up after ourselves."""
