"""Slicer-side library of the SAMEmbedding module: MRML <-> engine conversion, the logic, the worker thread.

Nothing here imports ``qt`` or uses ``slicer.app`` or a global scene, so it runs on ``slicer-core`` too.
"""
