"""How work runs: the scheduler (a pure policy and the executor thread), resource
choices at start (threads, the memory budget) and the engine's counters.
"""
