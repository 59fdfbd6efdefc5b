"""absl flag definitions for run.py and the presets (*.cfg) to pass with --flagfile."""
