"""The torchrun and Lightning example units pass systemd's verifier, with the job's venv pointing at
the real .venv-torch (torchrun, python) and the scripts at the repository's examples."""

from __future__ import annotations

from tests.system.test_unit_verify import ROOT, directives, run_with_usr_overlay


def test_example_job_units_verify(tmp_path):
    venv = ROOT / ".venv-torch"
    assert (venv / "bin" / "torchrun").exists(), "run scripts/setup-test-env.sh (.venv-torch)"
    units = []
    for name in ("torchrun.service", "lightning.service"):
        text = (ROOT / "examples" / name).read_text()
        assert "EnvironmentFile=-/run/spot-agent/workload.env" in text
        text = text.replace("/opt/train/venv", str(venv)).replace("/opt/train/", f"{ROOT}/examples/")
        (tmp_path / name).write_text(text)
        units.append(str(tmp_path / name))
    res = run_with_usr_overlay(["systemd-analyze", "verify", str(ROOT / "systemd" / "spot-agent.service"),
                                str(ROOT / "systemd" / "spot-agent-drain.service"), *units])
    assert res.returncode == 0 and res.stderr == "", res.stderr


def test_torchrun_unit_outwaits_torchrun():
    """systemd's own SIGKILL comes after torchrun's (TORCH_ELASTIC_SHUTDOWN_TIMEOUT = the wait budget + 1)."""
    from agent.config import parse
    from agent.drain import profiles

    svc = directives(ROOT / "examples" / "torchrun.service")["Service"]
    cfg = parse((ROOT / "examples" / "torchrun.toml").read_text())
    env = profiles.for_config(cfg).env
    assert int(svc["TimeoutStopSec"][0]) > int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"])
    assert svc["KillMode"] == ["mixed"] and profiles.for_config(cfg).kill_whom == "main"
