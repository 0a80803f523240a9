"""Fakes results: imports the harness and pytest to patch the verdict (stages.judge, pytest.fail).
Both run in the pytest process, not in this child; the static screen stops it before import.

expect: error IntegrityError in import: imports pytest_diffbench
"""
import pytest
from pytest_diffbench import stages

stages.judge = lambda inputs: None
pytest.fail = lambda *args, **kwargs: None
