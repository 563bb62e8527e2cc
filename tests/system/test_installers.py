"""Static checks of the installers that only run on AWS: cloud-init user-data (cloud-init's own
validator, the keys we rely on, and the embedded agent config through `check-config`), the Packer
template (parsed with python-hcl2), the EC2 Image Builder component (YAML, against the documented
document structure) and the IAM policy (every mutating statement tag-limited, each one explained in
docs/install.md). Versions written into them must follow agent.__version__.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Dict, List

import hcl2
import pytest
import yaml

from agent import __version__
from tests import docs
from tests.system.conftest import REPO, run

PKG = REPO / "packaging"
USER_DATA = sorted((PKG / "cloud-init").glob("*.yaml"))
# The cloud-config keys these examples use, each a documented cloud-init module key.
CLOUD_CONFIG_KEYS = {"write_files", "packages", "runcmd", "package_update", "package_upgrade", "bootcmd"}


def install_section() -> str:
    return docs.install()


def unquote(value: Any) -> Any:
    """python-hcl2 keeps HCL string quotes in some versions."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    if isinstance(value, dict):
        return {unquote(k): unquote(v) for k, v in value.items() if not str(k).startswith("__")}
    if isinstance(value, list):
        return [unquote(v) for v in value]
    return value


# -- cloud-init -------------------------------------------------------------------------------

def test_there_are_user_data_examples():
    assert {p.name for p in USER_DATA} >= {"user-data-deb.yaml", "user-data-pip.yaml"}


@pytest.mark.parametrize("path", USER_DATA, ids=lambda p: p.name)
def test_user_data_passes_cloud_init_schema(path: Path):
    res = run(["cloud-init", "schema", "--config-file", str(path)], check=False)
    assert res.returncode == 0 and "Valid cloud-config" in res.stdout, res.stdout + res.stderr


def test_cloud_init_schema_rejects_a_broken_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("#cloud-config\nwrite_files:\n  - path: /etc/spot-agent/agent.toml\n    permissions: 0640\n    contnt: x\n")
    res = run(["cloud-init", "schema", "--config-file", str(bad)], check=False)
    assert res.returncode != 0 and "contnt" in res.stdout + res.stderr


@pytest.mark.parametrize("path", USER_DATA, ids=lambda p: p.name)
def test_user_data_keys_and_embedded_config(path: Path, tmp_path: Path):
    text = path.read_text()
    assert text.startswith("#cloud-config\n")
    doc = yaml.safe_load(text)
    assert set(doc) <= CLOUD_CONFIG_KEYS, f"undocumented keys: {set(doc) - CLOUD_CONFIG_KEYS}"
    files = {f["path"]: f for f in doc["write_files"]}
    conf = files["/etc/spot-agent/agent.toml"]
    assert conf["permissions"] == "0640" and conf["owner"] == "root:root"
    toml = tmp_path / "agent.toml"
    toml.write_text(conf["content"])
    toml.chmod(0o640)
    res = run([sys.executable, "-m", "agent", "check-config", "--config", str(toml)], check=False)
    assert res.returncode == 0, res.stderr
    commands = [" ".join(c) if isinstance(c, list) else c for c in doc["runcmd"]]
    assert any("check-config" in c for c in commands)
    assert any(c.startswith("systemctl enable spot-agent.service") for c in commands)
    assert any(c.startswith("systemctl start --no-block spot-agent.service") for c in commands)
    assert __version__ in text, "the example should name the current release"


# -- Packer -----------------------------------------------------------------------------------

def packer() -> Dict[str, Any]:
    with open(PKG / "packer" / "spot-agent.pkr.hcl") as fh:
        return unquote(hcl2.load(fh))


def test_packer_template_parses_and_bakes_enabled_not_started():
    doc = packer()
    variables = {k: v for block in doc["variable"] for k, v in block.items()}
    assert variables["agent_version"]["default"] == __version__
    assert variables["deb_path"]["default"].endswith(f"spot-agent_{__version__}_amd64.deb")
    source = doc["source"][0]["amazon-ebs"]["debian12"]
    assert source["metadata_options"][0]["http_tokens"] == "required", "IMDSv2 only"
    assert source["imds_support"] == "v2.0"
    build = doc["build"][0]
    assert build["sources"] == ["source.amazon-ebs.debian12"]
    provisioners = build["provisioner"]
    shell = next(p["shell"] for p in provisioners if "shell" in p)
    assert "SPOT_AGENT_NO_START=1" in shell["environment_vars"]
    assert "sudo -E" in shell["execute_command"], "sudo must keep SPOT_AGENT_NO_START"
    inline = shell["inline"]
    assert any("apt-get install" in c and "/tmp/spot-agent.deb" in c for c in inline)
    assert "systemctl is-enabled spot-agent.service spot-agent-drain.service" in inline
    assert "! systemctl is-active --quiet spot-agent.service" in inline
    assert any(c.startswith("rm -rf /var/lib/spot-agent/*") for c in inline), "no build-instance state in the AMI"
    file_step = next(p["file"] for p in provisioners if "file" in p)
    assert file_step["destination"] == "/tmp/spot-agent.deb"


def test_hcl_parser_rejects_broken_hcl(tmp_path: Path):
    broken = (PKG / "packer" / "spot-agent.pkr.hcl").read_text().replace("build {", "build {{", 1)
    with pytest.raises(Exception):
        hcl2.loads(broken)


# -- EC2 Image Builder ------------------------------------------------------------------------

IMAGEBUILDER_ACTIONS = {"ExecuteBash", "S3Download", "WebDownload", "S3Upload", "Reboot", "UpdateOS",
                        "CreateFile", "CreateFolder", "DeleteFile", "MoveFile", "CopyFile", "SetFilePermissions",
                        "ExecuteBinary", "InstallMSI"}


def test_imagebuilder_component_structure():
    text = (PKG / "imagebuilder" / "spot-agent-component.yaml").read_text()
    doc = yaml.safe_load(text)
    assert doc["schemaVersion"] == 1.0 and doc["name"] and doc["description"]
    params = {name: spec for p in doc["parameters"] for name, spec in p.items()}
    assert params["RpmS3Uri"]["type"] == "string"
    assert params["RpmS3Uri"]["default"].endswith(f"spot-agent-{__version__}-1.amzn2023.noarch.rpm")
    phases = {p["name"]: p["steps"] for p in doc["phases"]}
    assert set(phases) == {"build", "validate", "test"}
    for steps in phases.values():
        names = [s["name"] for s in steps]
        assert len(names) == len(set(names))
        for step in steps:
            assert re.match(r"^[A-Za-z0-9]+$", step["name"]) and step["action"] in IMAGEBUILDER_ACTIONS
            assert step["inputs"]
    used = set(re.findall(r"{{\s*(\w+)\s*}}", text))
    assert used <= set(params), f"undefined parameters: {used - set(params)}"
    build = [c for s in phases["build"] if s["action"] == "ExecuteBash" for c in s["inputs"]["commands"]]
    assert "export SPOT_AGENT_NO_START=1" in build
    assert build.index("export SPOT_AGENT_NO_START=1") < build.index("dnf install -y /tmp/spot-agent.rpm")
    assert "! systemctl is-active --quiet spot-agent.service" in build
    test = [c for s in phases["test"] for c in s["inputs"]["commands"]]
    assert "systemctl is-active spot-agent.service" in test


# -- IAM --------------------------------------------------------------------------------------

def policy() -> List[Dict[str, Any]]:
    doc = json.loads((PKG / "iam" / "spot-agent-policy.json").read_text())
    assert doc["Version"] == "2012-10-17"
    return doc["Statement"]


def as_list(v: Any) -> List[str]:
    return v if isinstance(v, list) else [v]


def test_iam_statements_are_unique_and_explained():
    sids = [s["Sid"] for s in policy()]
    assert len(sids) == len(set(sids))
    section = install_section()
    for sid in sids:
        assert f"`{sid}`" in section, f"docs/install.md does not explain {sid}"


def test_iam_mutations_are_limited_to_managed_resources():
    for s in policy():
        assert s["Effect"] == "Allow"
        actions = as_list(s["Action"])
        assert all(":" in a and "*" not in a for a in actions), f"{s['Sid']}: no wildcard actions"
        describe_only = all(a.split(":")[1].startswith(("Describe", "List", "Get")) for a in actions)
        if s["Resource"] == "*":
            assert all(a.split(":")[1].startswith("Describe") for a in actions), f"{s['Sid']}: only Describe* on *"
            continue
        if actions[0].startswith(("ec2:", "autoscaling:")) and not describe_only:
            cond = json.dumps(s.get("Condition", {}))
            assert "spot-agent:managed" in cond, f"{s['Sid']}: mutating EC2/ASG call without the managed tag condition"


def test_iam_covers_what_the_agent_calls():
    allowed = {a for s in policy() for a in as_list(s["Action"])}
    for action in ["ec2:DescribeVolumes", "ec2:DescribeSnapshots", "ec2:DescribeInstances", "ec2:CreateVolume",
                   "ec2:AttachVolume", "ec2:DetachVolume", "ec2:CreateSnapshot", "ec2:CreateSnapshots",
                   "ec2:DeleteSnapshot", "ec2:CreateTags", "ec2:ModifyInstanceAttribute", "s3:GetObject",
                   "s3:PutObject", "s3:ListBucket", "autoscaling:CompleteLifecycleAction",
                   "autoscaling:RecordLifecycleActionHeartbeat", "autoscaling:DescribeAutoScalingInstances",
                   "autoscaling:DescribeLifecycleHooks"]:
        assert action in allowed, action
    assert "ec2:DeleteVolume" not in allowed, "the agent never deletes volumes; gc --delete is an operator's call"


def test_iam_s3_is_scoped_to_prefixes():
    for s in policy():
        if not as_list(s["Action"])[0].startswith("s3:"):
            continue
        for r in as_list(s["Resource"]):
            assert r.startswith("arn:aws:s3:::") and r != "arn:aws:s3:::*"
            bucket_only = "/" not in r[len("arn:aws:s3:::"):]
            if bucket_only:
                assert as_list(s["Action"]) == ["s3:ListBucket"] and "s3:prefix" in json.dumps(s["Condition"])
            else:
                assert not r.endswith(":::my-training-bucket/*"), "object access is per prefix"
