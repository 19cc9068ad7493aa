"""fleetpy: a fleet-style cluster scheduler for systemd units, with its state in etcd."""

__version__ = "0.1.0"
