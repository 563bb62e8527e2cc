"""The drain: tell the workload, wait for its checkpoint, persist it, complete the lifecycle action.

budget (pure planner) -> plan (data) -> executor (runs it, step by step, resumable) using workload,
freeze, snapshots and lifecycle at the edges.
"""
