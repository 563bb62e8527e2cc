"""Integration fixtures: loop devices, the local EC2 host and instance (see tests/blockdev_fixtures.py)."""

from tests.blockdev_fixtures import blockdevs, host, instance, loopdev, scratch_dir  # noqa: F401
