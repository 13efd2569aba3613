"""The inference service: deployments of model versions on supervised engines, and typed generation."""
