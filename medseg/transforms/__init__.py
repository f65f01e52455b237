"""MONAI dictionary transform presets built from params."""
