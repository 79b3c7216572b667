"""Embedded default configuration, installed as the ``cortex.conf`` package."""
