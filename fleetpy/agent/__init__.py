"""The agent: runs the units scheduled to its machine through systemd and reports their state."""
