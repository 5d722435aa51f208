"""Shared config building blocks imported by experiments/ (model sizes, optimiser and run presets)."""
