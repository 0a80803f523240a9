"""Repository root: environment defaults of the project's own test runs.

The benchmark itself needs nothing from here: the installed plugin (`pytest_diffbench.plugin`)
registers DiffAgent (`pytest_diffbench.agent.plugin`, the repository's agent/) and the model zoo
and data hooks (`pytest_diffbench.zoo.plugin`, fixtures/), so `pytest --diffbench-level=...` works
from any folder."""

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm otherwise fetches prices at import
os.environ.setdefault("HF_HUB_OFFLINE", "1")
