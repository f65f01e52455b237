"""Run tracking: the ``Tracker`` protocol and its MLflow implementation."""
