"""Stillroom's server: the gRPC edge (service), the torch engine (engine) and the store (store)."""

__version__ = "0.1.0"
