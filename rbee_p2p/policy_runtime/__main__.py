"""``python -m rbee_p2p.policy_runtime``: the Starlark policy worker (worker.py)."""

from .worker import main

raise SystemExit(main())
