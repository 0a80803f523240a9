"""The settings a user may keep in an ini file, and the one rule that reads them.

Each setting is a command-line option (`--diffbench-memory-mb`) with an ini key of its dest's name
(`diffbench_memory_mb`, in pytest.ini / pyproject.toml / tox.ini / setup.cfg or `-o`). Precedence,
as pytest-timeout's: the command line, then the option's environment variable where it has one
($DIFFBENCH_SANDBOX, ...), then the ini key, then the default. A relative path in the ini is
relative to the ini file's folder (the rootdir without one), as pytest's own path keys.

Per-run inputs (--diffbench-candidates, --diffbench-resume, --diffbench-profile,
--diffbench-seed-scope, --diffbench-shard, --diffbench-generate-only) have no ini key: kept in a
file they would silently apply to every run (a shard key would also reach DiffAgent's GA child
sessions, which read the same ini file). A scheduler that can only set the environment passes the shard in PYTEST_ADDOPTS
(`PYTEST_ADDOPTS=--diffbench-shard=$JOB_COMPLETION_INDEX/4`), which the GA's child sessions drop.

`resolve(options, ini, ...)` is plain: it takes the parsed options and a reader of ini values and
returns every setting's value, or raises SettingError naming the ini key and where it came from.
The plugin writes the values back into `config.option`, so every reader of an option sees them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

#: what --diffbench-exit can say: `failures` = pytest's own rule (any failed task exits 1),
#: `harness-only` = only harness errors (and failures outside the benchmark) exit non-zero
EXIT_FAILURES = "failures"
EXIT_HARNESS_ONLY = "harness-only"
EXIT_MODES = (EXIT_FAILURES, EXIT_HARNESS_ONLY)


class SettingError(ValueError):
    """A bad value of an ini key; the message names the key and the file (or `-o`)."""


def _choice(*choices: str) -> Callable[[str, Path], str]:
    def parse(text: str, base: Path) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return value
    return parse


def _levels(text: str, base: Path) -> str:
    from .tasks import parse_levels

    parse_levels(text)  # ValueError names the unknown level
    return text.strip()


def _text(text: str, base: Path) -> str:
    if not text.strip():
        raise ValueError("is empty")
    return text.strip()


def _path(text: str, base: Path) -> str:
    return str(base / Path(_text(text, base)).expanduser())


def _positive_int(text: str, base: Path) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise ValueError(f"{value} is not a positive number")
    return value


def _number(text: str, base: Path) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def _positive_number(text: str, base: Path) -> float:
    value = _number(text, base)
    if value <= 0:
        raise ValueError(f"{value:g} is not a positive number")
    return value


@dataclass(frozen=True)
class Setting:
    dest: str  # the option's dest, also its ini key
    parse: Callable[[str, Path], Any]  # ini text, ini folder -> value; ValueError says what is wrong
    default: Any  # the value when neither the command line nor the ini sets it
    help: str
    env: str | None = None  # read by the option's own code when the option is unset: it beats the ini


SETTINGS: tuple[Setting, ...] = (
    Setting("diffbench_level", _levels, None, "DiffBench levels to run (as --diffbench-level)"),
    Setting("diffbench_tasks", _path, None, "folder of task YAML files (as --diffbench-tasks)"),
    Setting("diffbench_models", _choice("auto", "tiny", "hub"), "auto", "model weights (as --diffbench-models)"),
    Setting("diffbench_zoo_dir", _path, None, "where the tiny zoo is built (as --diffbench-zoo-dir)",
            env="DIFFBENCH_ZOO_DIR"),
    Setting("diffbench_out", _path, None, "run directory (as --diffbench-out)"),
    Setting("diffbench_cache_dir", _path, None, "baseline cache (as --diffbench-cache-dir)", env="DIFFBENCH_CACHE_DIR"),
    Setting("diffbench_device", _text, "auto", "cpu, cuda or auto (as --diffbench-device)"),
    Setting("diffbench_speed", _choice("auto", "flops", "wall"), "auto", "how U is measured (as --diffbench-speed)"),
    Setting("diffbench_repeats", _positive_int, None, "timed calls per evaluation (as --diffbench-repeats)"),
    Setting("diffbench_samples", _positive_int, None, "workload size of every task (as --diffbench-samples)"),
    Setting("diffbench_clip", _text, None, "open_clip model for CLIP score (as --diffbench-clip)"),
    Setting("diffbench_clip_threshold", _number, 20.0, "stage 2 minimum CLIP score (as --diffbench-clip-threshold)"),
    Setting("diffbench_candidate_timeout", _positive_number, 900.0,
            "seconds per sandboxed run (as --diffbench-candidate-timeout)"),
    Setting("diffbench_memory_mb", _positive_int, 16384, "memory limit per sandboxed run (as --diffbench-memory-mb)"),
    Setting("diffbench_sandbox", _choice("auto", "bwrap", "landlock", "unshare", "none"), "auto",
            "candidate isolation (as --diffbench-sandbox)", env="DIFFBENCH_SANDBOX"),
    Setting("diffbench_warm_start", _choice("auto", "on", "off"), None,
            "fork sandboxed runs from a warm process (as --diffbench-warm-start)", env="DIFFBENCH_WARM_START"),
    Setting("diffbench_threads", _positive_int, None, "torch threads per child (as --diffbench-threads)"),
    Setting("diffbench_seeds", _choice("secret", "public"), None, "the workload's seeds (as --diffbench-seeds)",
            env="DIFFBENCH_SEEDS"),
    Setting("diffbench_exit", _choice(*EXIT_MODES), EXIT_FAILURES,
            "what makes the exit code fail (as --diffbench-exit)"),
)


def resolve(options: Mapping[str, Any], ini: Callable[[str], str], ini_folder: Path, ini_source: Callable[[str], str],
            environ: Mapping[str, str]) -> dict[str, Any]:
    """Every setting's value: `options[dest]` (None: not on the command line), else the default
    when the setting's environment variable is set (the option's own code reads it), else the ini
    value (`ini(key)`, "" when unset) parsed, else the default. `ini_source(key)` says where an
    ini value came from, for the error."""
    values = {}
    for setting in SETTINGS:
        given = options.get(setting.dest)
        if given is not None:
            values[setting.dest] = given
            continue
        text = "" if setting.env and environ.get(setting.env) else (ini(setting.dest) or "")
        if not text.strip():
            values[setting.dest] = setting.default
            continue
        try:
            values[setting.dest] = setting.parse(text, ini_folder)
        except ValueError as exc:
            raise SettingError(f"ini key {setting.dest} ({ini_source(setting.dest)}): {exc}") from None
    return values
