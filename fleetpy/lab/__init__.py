"""A local multi-node lab: simulated machines on one host."""
