"""Runnable examples: `python -m normext.examples.train_seg`."""
