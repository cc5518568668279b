"""Tests run by `.ci/run`."""
