"""Automatic segmentation in Orthanc: a Python plugin that queues series, a worker that segments them.

``plugin.py`` runs inside Orthanc (standard library only) and ``jobqueue.py`` is the durable
queue both sides share; ``config.py`` is the worker's YAML and ``worker.py`` the worker
(``medseg orthanc worker``). See the README, "Automatic segmentation in Orthanc".
"""
