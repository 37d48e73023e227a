"""The Monitor service: takes in descriptions and collects telemetry for the active policies."""
