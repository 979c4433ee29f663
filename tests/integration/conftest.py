"""The integration tier's shared fixture: ``mesh`` (forwarding.py) starts a forwarded job
over in-memory streams."""

from forwarding import mesh  # noqa: F401  (a fixture, registered by being here)
