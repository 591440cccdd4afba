"""Personalization, the on-policy distillation post's second experiment, on SmolLM2-135M-Instruct
(docs/personalization.md). Run it as `python -m stillroom_cookbook.recipes.personalization`.

- `experiment.py`: the stages (mid-training, distillation, SFT, controls), the workers and `main`;
- `data.py`: the synthetic documents of the Quillmoor Institute and the questions over their facts;
- `evaluation.py`: the scores of one set of weights (knowledge, instruction following);
- `report.py`: the table and plot from the result rows.
"""
