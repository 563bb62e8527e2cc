"""The drain: tell the workload, wait for its checkpoint, persist it, complete the lifecycle action.

planner (pure: notice + config -> plan) -> model (the plan and the report: plain,
serialisable data) -> executor (runs the plan step by step, resumable) using workload, freeze,
snapshots and lifecycle at the edges.
"""
