"""Stillroom's cookbook: recipes and the library loops they share. Uses the SDK only."""
