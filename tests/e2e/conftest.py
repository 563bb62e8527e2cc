"""End-to-end fixtures: the demo's embedded cloud, shared moto server, one fresh state per test.

Every scenario runs the real `spot-agent run` as a subprocess against an IMDS simulator and the strict
local AWS (agent.sim.strict in front of moto) over HTTP, with EBS volumes as loop devices (CI is root). The environment's teardown stops every process,
thaws and unmounts everything and detaches every loop device, even when the test failed.
"""

from __future__ import annotations

import pytest


@pytest.fixture
def cloud(strict_local_aws):
    """A DemoEnvironment on the session's strict local AWS (reset first, default fast settings): dataset
    seeded, Auto Scaling group made. The agents see the strict model; the environment's own checks see
    the truth (agent.sim.localaws.ORACLE_KEY)."""
    from agent.demo.environment import DemoEnvironment
    from agent.sim.strict import StrictSettings

    strict_local_aws.reset()
    strict_local_aws.strict.settings = StrictSettings.fast()
    env = DemoEnvironment(aws=strict_local_aws, block_devices=True).start()
    made = []
    env.instances = made  # type: ignore[attr-defined]
    try:
        env.seed_dataset()
        yield env
    finally:
        for inst in made:
            inst.close()
        env.close()


@pytest.fixture
def new_instance(cloud):
    """Make a SimInstance on ``cloud`` (closed in teardown); the first call creates the group."""
    from agent.demo.agent_config import DemoSettings
    from agent.demo.instance import SimInstance

    def make(name: str = "instance-1", instance_id: str = "", settings: DemoSettings = None,
             extra_config: str = "", s3_checkpoints: bool = False) -> SimInstance:
        iid = instance_id or cloud.create_group()
        inst = SimInstance(cloud, name, iid, settings or DemoSettings(), s3_checkpoints=s3_checkpoints,
                           extra_config=extra_config)
        cloud.instances.append(inst)
        return inst

    return make
