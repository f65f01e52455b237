"""Inference: sliding-window prediction and instance post-processing."""
