"""`python -m stillroom_cookbook.recipes.personalization`: the experiment's command (experiment.main)."""

from stillroom_cookbook.recipes.personalization.experiment import main

main()
