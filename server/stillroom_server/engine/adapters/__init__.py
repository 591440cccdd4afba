"""LoRA: one host per base model holding every run's and snapshot's adapters (lora.py),
and rows of many adapters in one forward (mixed_lora.py).
"""
