"""spot-agent: makes EC2 spot capacity safe for long training and batch jobs."""

__version__ = "0.1.0"
