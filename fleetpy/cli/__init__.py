"""Command-line tools: fleetctl and fleetpy."""
