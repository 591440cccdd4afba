"""The Tinker-compatible HTTP API (an ASGI app) and checkpoint downloads, over the same core."""
