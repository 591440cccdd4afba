"""Stillroom's cookbook. Uses the SDK only, never the server.

The library, here: the training loops (`supervised`, `rl`, `distillation`, with the on-policy head
they share in `on_policy`), `rollouts`, `evaluation`, `tasks` and `instruction_following` (tasks with
graders), `renderers`, `schedules`, `metrics`, and `local_server` (a server as a child process).
The experiments and demos, in `recipes/`: `quickstart`, `distillation_demo`, `comparison`,
`personalization`. Recipes import the library; the library never imports a recipe.
"""
