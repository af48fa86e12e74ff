"""Jobs end to end: run a job on a (local or remote) Ray cluster, submit it, sweep students."""
