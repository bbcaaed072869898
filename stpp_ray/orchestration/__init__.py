"""Orchestration: running a method's stage graph (pipeline, manifest), the report, the comparison
and the sweep logic.
"""
