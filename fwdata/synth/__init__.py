"""Synthetic scenes with ground truth: the renderer and datasets written in the contract."""
