"""The job helper (spot_agent_job.py): on the job's PYTHONPATH, not imported by the agent."""
