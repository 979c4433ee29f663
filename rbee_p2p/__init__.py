"""rbee-p2p: a peer-to-peer inference mesh with an OpenAI-compatible API."""

__version__ = "0.1.0"
__all__ = ["__version__"]
