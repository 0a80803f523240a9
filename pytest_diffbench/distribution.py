"""How a diffbench session's items are spread over pytest-xdist workers: by model family.

Tasks of one family load the same model files, so a worker that keeps to one family keeps its
page cache and (on GPUs) its memory for that family. Under `-n` with `--dist` left unset (or
`--dist loadgroup`), the plugin hands pytest-xdist `FamilyGroupScheduling`: LoadGroupScheduling
whose group of a suite item is its task's family, read from the node id against the session's
tasks; other items are grouped as LoadGroupScheduling groups them.

The group is not carried in `xdist_group` marks: pytest-xdist 3.8 sends such a group to the
controller by appending `@<group>` to the node id, which pytest 9.2 ignores (pytest-xdist issue
#1386), and a node id with `@<group>` printed on it selects nothing when given back.
"""

from __future__ import annotations

import re
from typing import Callable

from .plugin import SUITE_NODE_PATH
from .result import parse_label

_SUITE_ITEM = re.compile(rf"{re.escape(SUITE_NODE_PATH)}::test_task\[(?P<label>.*)\]")


def family_of(nodeid: str, family_of_task: Callable[[str], str | None]) -> str | None:
    """The family of the task a suite item's node id names (`family_of_task(task id)`); None for
    any other node id."""
    match = _SUITE_ITEM.fullmatch(nodeid)
    if match is None:
        return None
    task_id, _ = parse_label(match.group("label"))
    return family_of_task(task_id)


def family_scheduler(config, log, family_of_task: Callable[[str], str | None]):
    """A FamilyGroupScheduling for this session (pytest-xdist imported here: it may be absent)."""
    from xdist.scheduler import LoadGroupScheduling

    class FamilyGroupScheduling(LoadGroupScheduling):
        """LoadGroupScheduling with one group per model family of the suite's items."""

        def _split_scope(self, nodeid: str) -> str:
            family = family_of(nodeid, family_of_task)
            return f"diffbench-family:{family}" if family else super()._split_scope(nodeid)

    return FamilyGroupScheduling(config, log)
