"""fleetd: one process per machine running the agent, the engine and the API."""
