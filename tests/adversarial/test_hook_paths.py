"""The job user (uid nobody) attacks hook executables: symlinks it owns, links into its directories,
and a path it gains control of after the config was loaded. The hook must never run the job's code
as root; each refusal names the component; a fixed path runs again."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile

import pytest

from agent.config import ConfigError, HookSection, load
from agent.events import SPOT_INTERRUPTION, Event
from agent.hooks import run_hook

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")

EVENT = Event(SPOT_INTERRUPTION, "terminate", 1796000000.0, "spot:terminate", 1795999880.0, {})
NOBODY = pwd.getpwnam("nobody")


def as_job(*argv: str) -> None:
    """Run argv as the unprivileged job user: the attack is made with its real rights, not root's."""
    subprocess.run(list(argv), check=True, user=NOBODY.pw_uid, group=NOBODY.pw_gid, extra_groups=[],
                   cwd="/", timeout=30)


@pytest.fixture
def tree():
    """base (root, 0755) with job/ owned by the job user and bin/ owned by root; a marker the evil
    script would write (as whoever runs it) lives in a root-only place the job cannot pre-create."""
    base = tempfile.mkdtemp(prefix="spot-agent-adv-", dir="/tmp")
    os.chmod(base, 0o755)
    job = os.path.join(base, "job")
    os.mkdir(job, 0o755)
    os.chown(job, NOBODY.pw_uid, NOBODY.pw_gid)
    os.mkdir(os.path.join(base, "bin"), 0o755)
    marker_dir = os.path.join(base, "marker")
    os.mkdir(marker_dir, 0o777)  # anyone may write the marker; its owner says who ran the script
    evil = os.path.join(job, "evil.sh")
    as_job("sh", "-c", f"printf '#!/bin/sh\\nid -u > {marker_dir}/ran\\n' > {evil} && chmod 755 {evil}")
    yield {"base": base, "job": job, "evil": evil, "marker": os.path.join(marker_dir, "ran")}
    shutil.rmtree(base)


def config_with(base: str, command: str) -> str:
    path = os.path.join(base, "agent.toml")
    with open(path, "w") as fh:
        fh.write(f'[[hooks]]\non = ["spot-interruption"]\ncommand = ["{command}"]\n')
    os.chmod(path, 0o644)
    return path


def refused(result) -> bool:
    return not result.ok and result.error.startswith("hooks[0].command: refusing an unsafe hook executable:")


def test_job_owned_symlink_to_bin_true_is_refused_and_its_swap_never_runs(tree):
    link = os.path.join(tree["job"], "hook")
    as_job("ln", "-s", "/bin/true", link)
    # Before: realpath(link) is /usr/bin/true, owned by root, so the check passed.
    with pytest.raises(ConfigError) as exc:
        load(config_with(tree["base"], link), strict_permissions=True)
    assert f"hooks[0].command[0]: refusing an unsafe hook executable: {tree['job']} is owned by uid " \
           f"{NOBODY.pw_uid}, not root" in str(exc.value)
    r = subprocess.run([sys.executable, "-m", "agent", "check-config", "--config", os.path.join(tree["base"], "agent.toml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "refusing an unsafe hook executable" in r.stderr
    # The job re-points its link at its own script: the agent must not run it as root.
    as_job("ln", "-sfn", tree["evil"], link)
    result = run_hook(HookSection(on=[SPOT_INTERRUPTION], command=[link]), 0, EVENT)
    assert refused(result), result
    assert not os.path.exists(tree["marker"])


def test_root_owned_link_into_the_jobs_directory_is_refused(tree):
    link = os.path.join(tree["base"], "bin", "hook")
    os.symlink(tree["evil"], link)  # root made the link; its target is the job's to change
    with pytest.raises(ConfigError) as exc:
        load(config_with(tree["base"], link), strict_permissions=True)
    assert f"{tree['job']} is owned by uid {NOBODY.pw_uid}" in str(exc.value)
    assert refused(run_hook(HookSection(on=[SPOT_INTERRUPTION], command=[link]), 0, EVENT))
    assert not os.path.exists(tree["marker"])


def test_relative_link_through_dotdot_into_the_jobs_directory_is_refused(tree):
    link = os.path.join(tree["base"], "bin", "hook")
    os.symlink("../job/evil.sh", link)
    assert refused(run_hook(HookSection(on=[SPOT_INTERRUPTION], command=[link]), 0, EVENT))
    assert not os.path.exists(tree["marker"])


def test_path_that_became_the_jobs_after_load_is_refused_just_before_exec(tree):
    """Loaded while safe; then the directory is handed to the job (a provisioning mistake, a chown -R
    of the job's tree) and the job swaps the script. The check before exec catches it."""
    bindir = os.path.join(tree["base"], "bin")
    good = os.path.join(bindir, "hook.sh")
    with open(good, "w") as fh:
        fh.write(f"#!/bin/sh\necho good > {tree['marker']}.good\n")
    os.chmod(good, 0o755)
    cfg = load(config_with(tree["base"], good), strict_permissions=True)
    hook = cfg.hooks[0]
    assert run_hook(hook, 0, EVENT).ok and os.path.exists(tree["marker"] + ".good")
    os.chown(bindir, NOBODY.pw_uid, NOBODY.pw_gid)
    as_job("sh", "-c", f"cp {tree['evil']} {bindir}/x && mv -f {bindir}/x {good}")
    result = run_hook(hook, 0, EVENT)
    assert refused(result), result
    assert f"{bindir} is owned by uid {NOBODY.pw_uid}" in result.error
    assert not os.path.exists(tree["marker"])
    # Put right by root: the same hook runs again.
    os.chown(bindir, 0, 0)
    os.unlink(good)
    with open(good, "w") as fh:
        fh.write(f"#!/bin/sh\necho again > {tree['marker']}.good\n")
    os.chmod(good, 0o755)
    assert run_hook(hook, 0, EVENT).ok
    with open(tree["marker"] + ".good") as fh:
        assert fh.read() == "again\n"


def test_group_writable_directory_on_the_path_is_refused(tree):
    bindir = os.path.join(tree["base"], "bin")
    os.chmod(bindir, 0o775)
    link = os.path.join(bindir, "hook")
    os.symlink("/bin/true", link)
    result = run_hook(HookSection(on=[SPOT_INTERRUPTION], command=[link]), 0, EVENT)
    assert refused(result) and f"directory {bindir} is writable by group or others" in result.error
