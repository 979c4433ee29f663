"""Tenants, API keys and quotas: the tenants file (``tenants.py``) and the gate every
request passes on its entry node (``gate.py``: authentication, quotas (rate, tokens per day,
concurrency), per-tenant counters, content logs)."""
