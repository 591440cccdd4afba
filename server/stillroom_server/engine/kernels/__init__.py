"""Compute kernels beside torch's own: the segmented LoRA matmul (a C file built on first
use), prepacked oneDNN linears for frozen inference, and the batch-invariant mode's matmuls.
"""
