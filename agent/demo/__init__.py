"""`spot-agent demo`: the life of a spot training job on one machine, with no AWS account.

Pieces, from the outside in:
  environment  the embedded cloud: moto (S3/EC2/Auto Scaling) on loopback, EBS volumes as loop devices
               (root) or plain directories (not root), an Auto Scaling group with a terminating hook
  daemon       the real ``spot-agent run`` as a subprocess, with a notify socket standing in for systemd
  instance     one simulated EC2 instance: its IMDS simulator, agent config, daemon and toy workload
  story        the two-instance story (notice, drain, replacement, resume) and what it measured
  timeline     the text timeline, the summary and the SVG drawing of the drain (stdlib only)

The e2e tests (tests/e2e) drive the same pieces and assert on the result.
"""
