"""VESSA processes: the `vessa` CLI, the embedded Redis server, the Redis→Serve dispatcher, launchers."""
