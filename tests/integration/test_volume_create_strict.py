"""A volume spot-agent creates on the strict local AWS is still known as created empty and formatted,
although EC2 shows its creation tags a moment after the volume itself (found by the demo on the strict
local AWS: the licence check read the missing tags as "an older volume" and refused to format).

Real loop devices, real mkfs and mount, boto3 over HTTP to the strict middleware in front of moto."""

from __future__ import annotations

import pytest

from tests.blockdev_fixtures import volume

pytestmark = pytest.mark.root


@pytest.fixture
def aws(strict_aws):
    """Every fixture of the block-device host on the strict local AWS."""
    return strict_aws


def test_a_volume_created_empty_is_formatted_though_its_tags_show_late(host, strict_aws):
    assert strict_aws.server.strict.settings.tags_after_seconds > 0
    cfg = [volume("data", host.mnt("data"), fs="ext4", create={"size_gib": 1})]
    mgr = host.manager(cfg)
    [res] = mgr.up()
    assert res.ok, res.error
    assert "created" in res.actions and "formatted" in res.actions
    rec = mgr.records()["data"]
    assert rec["created_empty"] == res.volume_id and rec["formatted"] == res.volume_id
    [down] = mgr.down()
    assert down.ok
