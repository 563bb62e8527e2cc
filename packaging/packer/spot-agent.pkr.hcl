# Bakes spot-agent into a Debian 12 AMI: installed, enabled, NOT started on the build instance (so
# it mounts nothing and leaves no state behind), and started by systemd on every instance launched
# from the AMI. Build the .deb first (`make deb`), then:
#   packer init packaging/packer && packer build -var region=eu-west-1 packaging/packer
packer {
  required_plugins {
    amazon = {
      version = ">= 1.2.0"
      source  = "github.com/hashicorp/amazon"
    }
  }
}

variable "region" {
  type    = string
  default = "us-east-1"
}

variable "instance_type" {
  type    = string
  default = "t3.small"
}

variable "deb_path" {
  type        = string
  description = "the package built by `make deb`"
  default     = "packaging/deb/build/spot-agent_0.1.0_amd64.deb"
}

variable "agent_version" {
  type    = string
  default = "0.1.0"
}

source "amazon-ebs" "debian12" {
  region        = var.region
  instance_type = var.instance_type
  ssh_username  = "admin"
  ami_name      = "spot-agent-${var.agent_version}-debian12-{{timestamp}}"

  source_ami_filter {
    filters = {
      name                = "debian-12-amd64-*"
      architecture        = "x86_64"
      virtualization-type = "hvm"
      root-device-type    = "ebs"
    }
    owners      = ["136693071363"] # Debian's official AWS account
    most_recent = true
  }

  # IMDSv2 only, on the build instance and (imds_support) on instances launched from the AMI:
  # the agent never falls back to IMDSv1 unless its config says so.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }
  imds_support = "v2.0"

  tags = {
    "spot-agent:version" = var.agent_version
    "Name"               = "spot-agent ${var.agent_version} (Debian 12)"
  }
}

build {
  sources = ["source.amazon-ebs.debian12"]

  provisioner "file" {
    source      = var.deb_path
    destination = "/tmp/spot-agent.deb"
  }

  provisioner "shell" {
    # SPOT_AGENT_NO_START: the build instance runs systemd, so the maintainer script would
    # otherwise start the agent here. sudo -E keeps the variable.
    environment_vars = ["SPOT_AGENT_NO_START=1", "DEBIAN_FRONTEND=noninteractive"]
    execute_command  = "chmod +x {{ .Path }}; sudo -E sh -eux '{{ .Path }}'"
    inline = [
      "apt-get update",
      "apt-get install -y --no-install-recommends /tmp/spot-agent.deb",
      "spot-agent --version",
      "spot-agent check-config",
      "systemctl is-enabled spot-agent.service spot-agent-drain.service",
      "! systemctl is-active --quiet spot-agent.service",
      "rm -rf /var/lib/spot-agent/* /run/spot-agent /tmp/spot-agent.deb",
    ]
  }
}
