"""Helpers that several test modules share, imported as ``tests.helpers.<module>``; shared fixtures live in the
``conftest.py`` files. Scripts that tests start as processes (``ddp_equivalence.py``, ``ddp_datamodule.py``,
``readme_commands.py compose``) live here too and import nothing from ``tests``."""
