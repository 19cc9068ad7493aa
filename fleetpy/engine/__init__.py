"""The engine: the elected fleetd that assigns units to machines."""
