"""Labeling jobs: a whole dataset through the Redis request stream, resumable (see docs/jobs.md)."""
