"""Watchers: one per event source (IMDS, OS signals), each emitting typed events to one callback."""
