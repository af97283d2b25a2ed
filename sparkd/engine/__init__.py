"""Engines: readiness and liveness probes, and later swap planning and execution."""
