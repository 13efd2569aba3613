"""The pipeline service: the whole flow as one durable run of steps (see docs/architecture.md, Pipelines)."""
