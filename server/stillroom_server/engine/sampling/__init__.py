"""Sampling and scoring: the continuous-batching decode loop (batching.py), the per-row
sampler and its stop rules (sampler.py), the KV cache, the fast decode step and the logprob
computations shared with training (compute.py).
"""
