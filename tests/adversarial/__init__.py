"""Attacks by the job user (a real unprivileged uid) on the root agent: each case asserts nothing outside the intended tree was touched and the agent still works."""
