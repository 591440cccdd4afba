"""The cookbook's experiments and demos: runnable recipes built on the library one level up.

    python -m stillroom_cookbook.recipes.quickstart          # a first look: teach a preset one line
    python -m stillroom_cookbook.recipes.distillation_demo   # the CPU demo (bash scripts/demo.sh)
    python scripts/compare_distillation.py                   # recipes.comparison: SFT vs RL vs distillation
    python -m stillroom_cookbook.recipes.personalization     # SmolLM2-135M: mid-training, then distillation

A recipe owns its setup, data, scores and report, and imports the library (`stillroom_cookbook.<loop,
task, renderer, ...>`); the library never imports a recipe. A recipe of several modules is a package
(`personalization/`: the experiment, its documents, its scores and its report).
"""
