"""The HTTP layer (quart-trio): OpenAI-compatible endpoints, status, dashboard, metrics."""
