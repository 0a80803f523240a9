"""The pytest surface of DiffBench: options, collection, fixtures, hooks, summary.

The work is done by plain modules (tasks, evaluate, sandbox, stages, metrics, report); this
module only wires them into pytest. Without `--diffbench-level` it does nothing.

The profile is resolved once per session by the controller (pytest_diffbench.profile), sent to
xdist workers in its serialized form and written to `<run dir>/profile.json`; generators get a
`GenerationContext` (pytest_diffbench.generation), never this module's session object.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import pytest

from . import hookspecs, memcg, progress, report, settings
from .ablation import ablation_codes
from .atomic import write_json_atomic
from .evaluate import Candidate, Evaluator, HarnessError, Profile
from .profile import PROFILE_FILE, ProfileError, check_runnable, for_worker, read_profile, resolve_profile
from .result import TaskResult, parse_label, task_label
from .stages import HARNESS
from .workload import PUBLIC_SEEDS, SECRET_SEEDS, SEED_MODES, SEED_SCOPES, SHARED_SEEDS, VERDICT_SCOPE

log = logging.getLogger(__name__)

#: registered with this plugin, and only with it (so `-p no:diffbench` leaves them out as well):
#: DiffAgent, the generator behind --llm (its options need it registered before the command line is
#: parsed, hence here and not in pytest_configure), and the default model zoo and benchmark data
#: (pytest_diffbench_model_setup / _data_source, trylast: a conftest.py or plugin answers first).
#: Installed, the benchmark runs from any folder; `-p no:pytest_diffbench.agent.plugin` drops DiffAgent.
pytest_plugins = ["pytest_diffbench.agent.plugin", "pytest_diffbench.zoo.plugin"]

SESSION_KEY = pytest.StashKey["DiffbenchSession"]()
#: an item's TaskResult, set by the diffbench_evaluation fixture for pytest_runtest_makereport
RESULT_KEY = pytest.StashKey[TaskResult]()
#: --diffbench-generate-only: an item's candidates.jsonl entry (candidates.generated_entry)
GENERATED_KEY = pytest.StashKey[dict]()
SUITE_FILE = Path(__file__).with_name("suite.py")
#: the suite module's node id, wherever the package is installed: the items' ids are
#: `pytest_diffbench/suite.py::test_task[<label>]`, and such an id given back selects the item
SUITE_NODE_PATH = "pytest_diffbench/suite.py"


def pytest_addhooks(pluginmanager):
    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser):
    group = parser.getgroup("diffbench", "DiffBench: diffusion acceleration code benchmark")
    group.addoption("--diffbench-level", metavar="LEVELS", default=None,
                    help="run the DiffBench tasks of these levels: L1..L5, comma separated, or 'all'. "
                         "Without it the plugin collects nothing.")
    group.addoption("--diffbench-tasks", metavar="DIR", default=None,
                    help="folder of task YAML files (default: the ini key diffbench_tasks, else <rootdir>/tasks "
                         "where it holds task files, else the benchmark's own suite, installed with the plugin)")
    group.addoption("--diffbench-models", choices=("auto", "tiny", "hub"), default=None,
                    help="model weights: tiny = offline random stand-ins, hub = real weights from the "
                         "Hugging Face cache, auto = hub where available locally, else tiny (default: auto)")
    group.addoption("--diffbench-zoo-dir", metavar="DIR", default=None,
                    help="where the tiny zoo is built (default: $DIFFBENCH_ZOO_DIR or "
                         "~/.cache/pytest-diffbench/zoo)")
    group.addoption("--diffbench-candidates", metavar="PATH", default=None,
                    help="evaluate code already written: a folder of <task id>.py files or a JSONL "
                         "file of {task_id, code}")
    group.addoption("--diffbench-out", metavar="DIR", default=None,
                    help="run directory for per-task code, images and result JSON "
                         "(default: <rootdir>/.diffbench/runs/<timestamp>)")
    group.addoption("--diffbench-resume", action=argparse.BooleanOptionalAction, default=None,
                    help="reuse complete task results already in the run directory (default: on when "
                         "--diffbench-out names an existing run directory, off otherwise)")
    group.addoption("--diffbench-cache-dir", metavar="DIR", default=None,
                    help="baseline cache (default: $DIFFBENCH_CACHE_DIR or ~/.cache/pytest-diffbench)")
    group.addoption("--diffbench-device", default=None, metavar="DEVICE",
                    help="cpu, cuda or auto (cuda when available) (default: auto)")
    group.addoption("--diffbench-speed", choices=("auto", "flops", "wall"), default=None,
                    help="how U is measured: flops (denoiser FLOPs, deterministic), wall (timed calls), "
                         "auto = flops on the tiny zoo, wall otherwise (default: auto)")
    group.addoption("--diffbench-repeats", type=int, default=None, metavar="N",
                    help="timed calls per evaluation after the first (default: 1 with flops, 3 with wall)")
    group.addoption("--diffbench-samples", type=int, default=None, metavar="N",
                    help="override the workload size of every task (default: the task's, usually 10)")
    group.addoption("--diffbench-clip", default=None, metavar="SPEC",
                    help="open_clip model for CLIP score: NAME/PRETRAINED or local-dir:DIR "
                         "(default: the zoo's choice; on the tiny zoo a tiny random CLIP)")
    group.addoption("--diffbench-clip-threshold", type=float, default=None, metavar="SCORE",
                    help="stage 2 minimum mean CLIP score, applied with learned CLIP weights (default: 20)")
    group.addoption("--diffbench-candidate-timeout", type=float, default=None, metavar="SECONDS",
                    help="wall-clock limit per sandboxed run (default: 900)")
    group.addoption("--diffbench-memory-mb", type=int, default=None, metavar="MB",
                    help="resident memory limit per sandboxed run (default: 16384)")
    group.addoption("--diffbench-replay", choices=("auto", "on", "off"), default=None,
                    help="prove each candidate's judged call by replaying its trace in the harness on the verdict's "
                         "seeds (its images and FLOPs are then the replay's): auto (default; $DIFFBENCH_REPLAY) = on "
                         "where speed is FLOP-counted on a CPU, off elsewhere (docs/integrity.md)")
    group.addoption("--diffbench-sandbox", choices=("auto", "bwrap", "landlock", "unshare", "none"), default=None,
                    help="how candidates are isolated: bwrap (bubblewrap: read-only allowlisted file system, private "
                         "/tmp, own pid and network namespaces, Landlock inside where the kernel has it), landlock "
                         "(kernel-enforced read-only allowlist, writes only to a private scratch folder, no TCP), "
                         "unshare (WEAK: own pid and network namespaces, shared file system), none (WEAK); "
                         "auto = $DIFFBENCH_SANDBOX, else bwrap or landlock, else the session stops with an error "
                         "(it never picks a weak one) (default: auto)")
    group.addoption("--diffbench-warm-start", choices=("auto", "on", "off"), default=None,
                    help="fork each sandboxed run from a per-worker process that has imported torch and diffusers "
                         "(same isolation per run; ~0.1 s instead of seconds to reach the candidate): on, off, or "
                         "auto = on for CPU runs, off for GPU runs (default: $DIFFBENCH_WARM_START, else auto)")
    group.addoption("--diffbench-threads", type=int, default=None, metavar="N",
                    help="torch threads per child (default: 1 on the tiny zoo on a CPU, else CPU count / xdist workers)")
    group.addoption("--diffbench-seeds", choices=SEED_MODES, default=None,
                    help="the workload's seeds: secret = derived from the harness's per-user key (<cache dir>/"
                         "secret.key), unpredictable to a candidate's author, and for the final verdict each "
                         "candidate's own (its code's digest; the gold keeps the workload's); shared = the same per "
                         "workload for every candidate (baselines shared, but a candidate can write the verdict's "
                         "noise into its images for a later submission: WEAK); public = the task's seed + i, the "
                         "same for every user (reproducible figures) but predictable, so a candidate can precompute "
                         "its images (WEAK, recorded in every result) (default: $DIFFBENCH_SEEDS, else secret)")
    group.addoption("--diffbench-seed-scope", choices=SEED_SCOPES, default=VERDICT_SCOPE,
                    help="whose seeds secret seeds are: verdict (the final verdict) or agent (runs whose output a "
                         "generator reads: DiffAgent's GA child sessions pass it) (default: verdict)")
    group.addoption("--diffbench-profile", metavar="FILE", default=None,
                    help="use this resolved profile (the profile.json of a run directory) instead of resolving one "
                         "from the options above; it is checked against what this machine can run (versions, "
                         "device, sandbox). DiffAgent's GA child sessions get their parent's this way")
    group.addoption("--diffbench-shard", metavar="K/N", default=None,
                    help="run shard K of N (K counted from 0: 0/4 .. 3/4) of the selected tasks (after the levels, "
                         "-k, -m and node ids), balanced by expected cost; `diffbench merge` joins the shards' run "
                         "directories into one run (docs/scale-out/)")
    group.addoption("--diffbench-generate-only", action="store_true", default=None,
                    help="run the generator of each task and write its code to <run dir>/candidates.jsonl without "
                         "evaluating it (an LLM's API calls apart from GPU time); --diffbench-candidates=<that file> "
                         "evaluates it later, its LLM cost included")
    group.addoption("--diffbench-exit", choices=settings.EXIT_MODES, default=None,
                    help="what makes the exit code fail: failures = any failed task (pytest's rule), harness-only "
                         "= only harness errors and failures outside the benchmark, for CI sweeps where a model "
                         "failing a task is a result, not a broken run (default: failures)")
    # command line > environment variable > ini > default (pytest_diffbench.settings)
    for setting in settings.SETTINGS:
        parser.addini(setting.dest, setting.help, default="")


def warm_start_setting(config) -> str:
    """--diffbench-warm-start, else $DIFFBENCH_WARM_START, else auto; a bad value stops the session."""
    from .sandbox import WARM_STARTS

    value = (config.getoption("diffbench_warm_start") or os.environ.get("DIFFBENCH_WARM_START", "").strip().lower()
             or "auto")
    if value not in WARM_STARTS:
        raise pytest.UsageError(f"$DIFFBENCH_WARM_START: {value!r} is not one of {', '.join(WARM_STARTS)}")
    return value


def replay_setting(config) -> str:
    """--diffbench-replay, else $DIFFBENCH_REPLAY, else auto; a bad value stops the session."""
    from .profile import REPLAY_SETTINGS

    value = config.getoption("diffbench_replay") or os.environ.get("DIFFBENCH_REPLAY", "").strip().lower() or "auto"
    if value not in REPLAY_SETTINGS:
        raise pytest.UsageError(f"$DIFFBENCH_REPLAY: {value!r} is not one of {', '.join(REPLAY_SETTINGS)}")
    return value


class DiffbenchSession:
    """The run's state, built once per process in pytest_configure."""

    def __init__(self, config, tasks, levels):
        self.config, self.tasks, self.levels = config, tasks, levels
        self.by_id = {t.id: t for t in tasks}
        self.started = time.time()
        self.results: list[TaskResult] = []  # controller: one per task, from the reports (report_row)
        self.run_dir = self._run_dir()
        self.cache_dir = Path(config.getoption("diffbench_cache_dir") or os.environ.get("DIFFBENCH_CACHE_DIR")
                              or Path.home() / ".cache" / "pytest-diffbench")
        self.zoo_dir = Path(config.getoption("diffbench_zoo_dir") or os.environ.get("DIFFBENCH_ZOO_DIR")
                            or Path.home() / ".cache" / "pytest-diffbench" / "zoo")
        self._evaluator: Evaluator | None = None
        self.profile: Profile | None = None  # resolved once (resolve_session_profile); None: _setup_error says why
        self.candidates = None  # the CandidatesGenerator when --diffbench-candidates is given
        self._calibrations: dict = {}
        self.tasks_dir: Path | None = None
        resume = config.getoption("diffbench_resume")
        workerinput = getattr(config, "workerinput", None)
        if workerinput and "diffbench_resume" in workerinput:
            resume = workerinput["diffbench_resume"]  # decided once by the controller
        elif resume is None:
            given = config.getoption("diffbench_out")
            resume = bool(given) and Path(given).is_dir()
        self.resume = resume
        self._setup_error: str | None = None
        self.record = None  # the controller's runrecord.RunRecorder (run.json, results.jsonl)
        self.task_lines: progress.TaskLines | None = None  # the controller's line per finished task
        self._progress_tail: progress.ProgressTail | None = None  # the controller's reader of workers' events
        self._terminal_line = None  # write(line) on this process's terminal; None in an xdist worker
        self.shard = None  # shards.Shard of --diffbench-shard
        self.shard_plan = None  # shards.ShardPlan, in the process that collected
        self.generate_only = bool(config.getoption("diffbench_generate_only"))
        self.generated: list[dict] = []  # controller, --diffbench-generate-only: the entries written

    def _run_dir(self) -> Path:
        workerinput = getattr(self.config, "workerinput", None)
        if workerinput and "diffbench_out" in workerinput:
            return Path(workerinput["diffbench_out"])
        given = self.config.getoption("diffbench_out")
        if given:
            return Path(given).resolve()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return self.config.rootpath / ".diffbench" / "runs" / stamp

    # -- hooks: the session object is registered as a plugin ------------------------------
    def pytest_runtest_logreport(self, report):
        entry = getattr(report, REPORT_GENERATED, None)
        if isinstance(entry, dict) and getattr(self.config, "workerinput", None) is None:
            from .candidates import GENERATED_FILE, append_generated

            self.generated.append(entry)
            append_generated(self.run_dir / GENERATED_FILE, entry)
        result = report_row(report)
        if result is not None:
            self.results.append(result)
            if self.record is not None:
                self.record.add(result)
        if self.task_lines is not None:
            item = getattr(report, REPORT_ITEM, None)
            if result is not None:
                self.task_lines.outcome(report.nodeid, result.label, progress.verdict_text(result), result)
                if report.when == "???":  # a crashed worker's item: no logfinish follows
                    self.task_lines.finished(report.nodeid)
            elif item is not None and report.skipped and report.when == "setup":
                reason = report.longrepr[2] if isinstance(report.longrepr, (tuple, list)) else report.longrepr
                self.task_lines.outcome(report.nodeid, item["label"], f"skipped ({progress.clean_text(reason, 100)})")

    # the task lines (progress.py): the controller sees every item start and finish, also under xdist
    def pytest_collection_finish(self, session):
        if self.task_lines is not None:  # without xdist: the items left after -k, -m, deselection
            self.task_lines.collected(sum(_is_task(item.nodeid) for item in session.items))

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids):
        if self.task_lines is not None:  # xdist's controller collects nothing; each worker says what it has
            self.task_lines.collected(sum(map(_is_task, ids)))

    def pytest_runtest_logstart(self, nodeid, location):
        if self.task_lines is not None and _is_task(nodeid):
            self.task_lines.started(nodeid)

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logfinish(self, nodeid, location):
        if self.task_lines is not None:
            self.task_lines.finished(nodeid)

    def report_progress(self, label: str, text: str) -> None:
        """A generator's progress (`GenerationContext.progress`): appended to progress.jsonl, and
        printed here when this process owns the terminal (under xdist the controller's tail prints it)."""
        worker = (getattr(self.config, "workerinput", None) or {}).get("workerid")
        try:
            event = progress.ProgressLog(self.run_dir, worker).emit(label, text)
        except OSError as exc:  # progress is for people watching: never a task's failure
            log.warning("progress of %s not recorded: %s", label, exc)
            event = {"label": label, "text": text, "worker": worker}
        if self._terminal_line is not None:
            self._terminal_line(progress.event_line(event))

    def pytest_terminal_summary(self, terminalreporter):
        if getattr(self.config, "workerinput", None) is not None or self.config.option.collectonly:
            return
        terminalreporter.section("diffbench summary")
        if self.generate_only:
            from .candidates import GENERATED_FILE

            path = self.run_dir / GENERATED_FILE
            terminalreporter.write_line(f"generate-only: {len(self.generated)} candidate(s) written to {path}, not "
                                        f"evaluated; evaluate them with --diffbench-candidates={path}")
            return
        for line in report.summary_lines(self.results, self.levels, time.time() - self.started, self.run_dir):
            terminalreporter.write_line(line)

    def calibration(self, profile_name: str):
        """The L4/L5 calibration of this hardware profile (None when there is none)."""
        if profile_name not in self._calibrations:
            from .calibration import load_calibration

            self._calibrations[profile_name] = load_calibration(self.tasks_dir, profile_name)
        return self._calibrations[profile_name]

    def resume_fingerprint(self, task, candidate_code: str | None) -> dict:
        """What a result may be reused for: the task as posed on this profile (calibrated target,
        reference, gold) and the generator (with the candidate's code where it is known without
        running the generator: --diffbench-candidates). Written beside result.json as resume.json."""
        generator = self.generator_id()
        digest = lambda text: hashlib.sha256(text.encode()).hexdigest()[:16]  # noqa: E731
        return {"task": digest(json.dumps(task.to_dict(), sort_keys=True, default=str)), "generator": generator,
                "candidate": None if candidate_code is None else digest(candidate_code),
                "seeds": f"{self.profile.seeds}:{self.profile.seed_scope}",
                **({"proof": "replay"} if self.profile.replay else {})}  # a result proved by replay is another result

    def generator_id(self) -> str:
        """The generator of this session, as it names itself (hook pytest_diffbench_generator_id)."""
        return self.config.hook.pytest_diffbench_generator_id(config=self.config) or "reference"

    def generation_context(self, task, label: str):
        """The context handed to pytest_diffbench_generate for `task` (pytest_diffbench.generation)."""
        from .generation import GenerationContext
        from .population import ChildSessions

        if self._setup_error:
            raise HarnessError(self._setup_error)
        # populations are measured under this session's settings: the verdict's (population.py)
        population = ChildSessions.for_session(
            self.profile, rootdir=self.config.rootpath, inifile=self.config.inipath, tasks_dir=self.tasks_dir,
            cache_dir=self.cache_dir, in_xdist_worker=getattr(self.config, "workerinput", None) is not None)
        return GenerationContext(task, self.profile, self.run_dir / label, self.cache_dir, self.evaluator,
                                 population=population, progress=lambda text: self.report_progress(label, text),
                                 calibration=lambda: self.calibration(self.profile.name))

    def previous_result(self, label: str, profile_name: str, fingerprint: dict) -> TaskResult | None:
        """The complete result of `label` from an earlier session on the same profile, for the
        same task and generator (`fingerprint`), if any (marked `resumed`).

        Both files must carry a valid tag of the harness key (keys.py) for this run directory and
        label, and resume.json must name the very result.json beside it: a file written by anything
        else (a candidate that could write there, another task's files copied over) is not reused;
        the task is evaluated again, with a warning naming the file."""
        from . import keys

        folder = self.run_dir / label
        try:
            record = json.loads((folder / "result.json").read_text())
            recorded = json.loads((folder / RESUME_FILE).read_text())
        except (OSError, ValueError):
            return None  # absent, cut short by a kill, or from before fingerprints: evaluate again
        secret = keys.secret_key(self.cache_dir)
        context = keys.run_context(self.run_dir, label)
        for path, data, purpose in ((folder / "result.json", record, "result"), (folder / RESUME_FILE, recorded, "resume")):
            if not keys.verify_record(secret, purpose, context, data):
                warnings.warn(f"diffbench: not reusing {path}: it has no valid tag of this harness's key "
                              f"({keys.key_path(self.cache_dir)}); written by something else, or before the key "
                              f"changed. The task is evaluated again.", stacklevel=2)
                return None
        if recorded.get("result") != keys.canonical_digest(record):
            warnings.warn(f"diffbench: not reusing {folder / 'result.json'}: it is not the result "
                          f"{folder / RESUME_FILE} was written for. The task is evaluated again.", stacklevel=2)
            return None
        try:
            result = TaskResult.from_json(record)
        except ValueError as exc:  # tagged by this harness, but not a result this version reads
            warnings.warn(f"diffbench: not reusing {folder / 'result.json'}: {exc}. The task is evaluated again.",
                          stacklevel=2)
            return None
        if not result.complete or result.provenance.profile != profile_name:
            return None
        if recorded.get("fingerprint") != fingerprint:
            # another task version, calibration, generator or candidate: the old verdict is not this one's
            return None
        return dataclasses.replace(result, resumed=True)

    def write_resume(self, label: str, fingerprint: dict) -> None:
        """resume.json beside a complete result.json: its fingerprint and the digest of that
        result, tagged with the harness key for this run directory and label."""
        from . import keys

        folder = self.run_dir / label
        record = json.loads((folder / "result.json").read_text())
        data = {"fingerprint": fingerprint, "result": keys.canonical_digest(record)}
        signed = keys.sign_record(keys.secret_key(self.cache_dir), "resume", keys.run_context(self.run_dir, label), data)
        write_json_atomic(folder / RESUME_FILE, signed, sort_keys=True)

    def model_setup(self, build: bool):
        ids = sorted({t.model for t in self.tasks})
        setup = self.config.hook.pytest_diffbench_model_setup(
            config=self.config, mode=self.config.getoption("diffbench_models"), zoo_dir=self.zoo_dir,
            model_ids=ids, build=build)
        if setup is None:
            raise HarnessError("no plugin provides the model zoo (pytest_diffbench_model_setup): the plugin's own "
                               "(pytest_diffbench.zoo.plugin) is disabled (-p no:...) and nothing else answers")
        return setup

    def evaluator(self) -> Evaluator:
        """Built on first use in each worker from the session's profile; a failure is a harness error
        for every task."""
        if self._setup_error:
            raise HarnessError(self._setup_error)
        if self._evaluator is None:
            data = self.config.hook.pytest_diffbench_data_source(config=self.config)
            if data is None:
                self._setup_error = "no plugin provides the benchmark data (pytest_diffbench_data_source)"
                raise HarnessError(self._setup_error)
            # a generator's own sessions (DiffAgent's GA rounds, in the agent's seed scope) keep no
            # copies of the baselines' images: nobody reads them, and a GA round has many candidates
            self._evaluator = Evaluator(self.profile, data, self.cache_dir, self.run_dir,
                                        keep_baseline_images=self.profile.seed_scope == VERDICT_SCOPE)
        return self._evaluator

    def resolve_session_profile(self) -> None:
        """The profile, resolved once per session (pytest_diffbench.profile): an xdist worker takes
        the controller's (workerinput) and applies its own CUDA device; --diffbench-profile names one
        resolved elsewhere (a usage error when this machine cannot run it); otherwise it is resolved
        from the options. A profile that cannot be resolved (models, CUDA) is a harness error of
        every task, as the evaluator's setup was."""
        config = self.config
        workerinput = getattr(config, "workerinput", None)
        worker_id = (workerinput or {}).get("workerid")
        if workerinput and ("diffbench_profile" in workerinput or "diffbench_profile_error" in workerinput):
            self._setup_error = workerinput.get("diffbench_profile_error")
            if workerinput.get("diffbench_profile"):
                self.profile = for_worker(Profile.from_json(workerinput["diffbench_profile"]), worker_id)
            return
        given = config.getoption("diffbench_profile")
        if given:
            try:
                profile = read_profile(given)
                check_runnable(profile)
            except ProfileError as exc:
                raise pytest.UsageError(f"--diffbench-profile: {exc}") from None
            self.profile = for_worker(profile, worker_id)
            return
        try:
            # the zoo is built here, once, before any worker starts (not for --collect-only)
            setup = self.model_setup(build=not config.option.collectonly)
            opt = config.getoption
            self.profile = resolve_profile(
                setup, device=opt("diffbench_device"), speed=opt("diffbench_speed"), repeats=opt("diffbench_repeats"),
                threads=opt("diffbench_threads"), workers=_measuring_workers(config), samples=opt("diffbench_samples"),
                clip=opt("diffbench_clip"), clip_threshold=opt("diffbench_clip_threshold"),
                timeout_s=opt("diffbench_candidate_timeout"), memory_mb=opt("diffbench_memory_mb"),
                isolation=opt("diffbench_sandbox"), warm_start=warm_start_setting(config), seeds=seed_mode(config),
                seed_scope=opt("diffbench_seed_scope"), worker_id=worker_id,
                replay=replay_setting(config))
        except pytest.UsageError:
            raise
        except Exception as exc:  # models unavailable, CUDA missing...: every task is a harness error
            self._setup_error = str(exc) if isinstance(exc, (HarnessError, ProfileError)) else f"{type(exc).__name__}: {exc}"

    def pytest_sessionstart(self, session):
        """The controller (or the only process) writes the resolved profile into the run directory."""
        if getattr(self.config, "workerinput", None) is not None or self.config.option.collectonly:
            return
        if self.profile is not None:
            from .atomic import write_atomic

            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(self.run_dir / PROFILE_FILE, self.profile.to_json() + "\n")
        from . import runrecord
        from .candidates import GENERATED_FILE
        from .shards import SHARD_FILE

        if self.generate_only:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / GENERATED_FILE).write_text("")  # this session's candidates, from the start
        # an earlier session's plan is not this one's: the collecting process (an xdist worker,
        # started after this hook) writes this session's
        (self.run_dir / SHARD_FILE).unlink(missing_ok=True)
        self.record = runrecord.RunRecorder(self.run_dir, runrecord.run_info(
            self.config, profile=self.profile, levels=self.levels, tasks_dir=self.tasks_dir,
            generator=self.generator_id(), tasks_at_levels=len(self.tasks), cache_dir=self.cache_dir))
        self.record.start()
        self._start_progress()

    def _start_progress(self) -> None:
        """The task lines and, under xdist, the thread printing the workers' progress events."""
        write = terminal_line_writer(self.config)
        verbosity = self.config.get_verbosity()
        if write is None or verbosity <= -2:  # -qq: pytest's own output only
            return
        self._terminal_line = write
        self.task_lines = progress.TaskLines(write, verbosity, workers=_measuring_workers(self.config))
        if self.config.pluginmanager.has_plugin("dsession"):  # pytest-xdist's controller
            self._progress_tail = progress.ProgressTail(self.run_dir, self._terminal_line)
            self._progress_tail.start()

    def pytest_sessionfinish(self, session, exitstatus):
        if self._progress_tail is not None:  # before the summary: the last events first
            self._progress_tail.stop()
            self._progress_tail = None
        if self.record is not None:
            if self.shard is not None:
                self.record.info["shard"] = self.shard_record()
            # session.exitstatus: as the exit-status hooks (tryfirst) left it
            self.record.finish(self.results, self.levels, session.exitstatus)

    def shard_record(self) -> dict | None:
        """This session's shard plan as the collecting process wrote it (shard.json), None when
        none was written (collection failed) or it is not this shard's."""
        from .shards import ShardError, read_record

        try:
            record = read_record(self.run_dir)
        except ShardError:
            return None
        if record is None or (record["index"], record["count"]) != (self.shard.index, self.shard.count):
            return None
        return record

    def select_shard(self, config, items) -> None:
        """Keep this shard's part of the items that would run (pytest_collection_modifyitems, after
        -k, -m and node ids); the others are deselected. Writes the plan to shard.json."""
        from . import shards

        labelled = [(item, _task_of(item)) for item in items]
        selected = {label: task for _, (label, task) in labelled if task is not None}
        self.shard_plan = shards.plan(self.shard, selected, generating=shards.generates(self.generator_id()))
        mine = set(self.shard_plan.mine)
        # other tests beside the suite (no task) run in every shard
        drop = [item for item, (label, task) in labelled if task is not None and label not in mine]
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = [item for item, (label, task) in labelled if task is None or label in mine]
        if not config.option.collectonly:
            shards.write_record(self.run_dir, self.shard_plan.record())


def _task_of(item) -> tuple:
    """(label, task) of a suite item, (None, None) for any other item."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    task = params.get("diffbench_task")
    return (task_label(task.id, params.get("diffbench_candidate_id")), task) if task is not None else (None, None)


def _is_task(nodeid: str) -> bool:
    """Whether `nodeid` is an item of the suite (a task), not another test collected beside it."""
    return nodeid.startswith(f"{SUITE_NODE_PATH}::test_task[")


def terminal_line_writer(config):
    """write(line): one line on the terminal of this process, on a line of its own after pytest's
    progress dots, with pytest's capture suspended (a generator's progress arrives during a test);
    callable from the controller's progress thread (a lock orders the lines). None without a
    terminal reporter (an xdist worker, `-p no:terminal`)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or getattr(config, "workerinput", None) is not None:
        return None
    capture = config.pluginmanager.get_plugin("capturemanager")
    lock = threading.Lock()

    def write(line: str) -> None:
        with lock, (capture.global_and_fixture_disabled() if capture is not None else nullcontext()):
            reporter.ensure_newline()
            if reporter._tw.width_of_current_line:  # dots of pytest's progress (under xdist: no fspath)
                reporter.write("\n")
            reporter.write_line(line)
            reporter.flush()

    return write


def _measuring_workers(config) -> int:
    """How many processes measure at once: the xdist workers of this session (1 without xdist)."""
    if getattr(config, "workerinput", None) is not None:
        return int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if config.getoption("dist", "no") == "no":
        return 1
    return max(1, len(config.getoption("tx", None) or []))


def _load_tasks(config):
    from .tasks import TaskError, load_tasks, parse_levels, select_tasks

    try:
        levels = parse_levels(config.getoption("diffbench_level"))
    except ValueError as exc:
        raise pytest.UsageError(f"--diffbench-level: {exc}") from None
    tasks_dir = tasks_folder(config)
    try:
        tasks = load_tasks(tasks_dir)
    except TaskError as exc:
        raise pytest.UsageError(f"invalid DiffBench task: {exc}") from None
    return select_tasks(tasks, levels), {t.id for t in tasks}, levels, tasks_dir


def tasks_folder(config) -> Path:
    """The folder of task files: --diffbench-tasks, else the ini key diffbench_tasks (both in
    config.option after apply_settings), else <rootdir>/tasks where it is a folder of task files,
    else the benchmark's installed suite (pytest_diffbench.tasks.default_tasks_dir)."""
    from .tasks import default_tasks_dir

    given = config.getoption("diffbench_tasks")
    if given:
        tasks_dir = Path(given)
        if not tasks_dir.is_dir():
            raise pytest.UsageError(f"--diffbench-tasks: {tasks_dir} is not a folder of task YAML files")
        return tasks_dir
    try:
        return default_tasks_dir(config.rootpath)
    except FileNotFoundError as exc:
        raise pytest.UsageError(f"--diffbench-tasks: {config.rootpath / 'tasks'} is not a folder of task YAML "
                                f"files, and {exc}") from None


def apply_settings(config) -> None:
    """Each setting's value (command line > environment variable > ini > default,
    pytest_diffbench.settings) written back into config.option, where every reader finds it."""
    overridden = {entry.partition("=")[0].strip() for entry in (config.getoption("override_ini", None) or [])}

    def source(key: str) -> str:
        return "-o" if key in overridden else str(config.inipath or "ini file")

    try:
        values = settings.resolve(vars(config.option), config.getini,
                                  config.inipath.parent if config.inipath else config.rootpath, source, os.environ)
    except settings.SettingError as exc:
        raise pytest.UsageError(str(exc)) from None
    for dest, value in values.items():
        setattr(config.option, dest, value)


def _register_markers(config) -> None:
    """Every task item is marked with its level, family and methods (`-m "L3 and deepcache"`);
    registered so that --strict-markers passes."""
    from .tasks import MARKERS

    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")


def suite_argument(arg: str, invocation_dir: Path) -> str | None:
    """`arg` pointed at this installation's suite file when it names the suite: a node id as
    pytest prints it (`pytest_diffbench/suite.py::test_task[<label>]`, relative to the rootdir or,
    from another folder, to that folder) or the file's own path; None for any other argument."""
    path, sep, rest = arg.partition("::")
    if Path(path).parts[-2:] != tuple(SUITE_NODE_PATH.split("/")) and (invocation_dir / path).resolve() != SUITE_FILE:
        return None
    return f"{SUITE_FILE}{sep}{rest}"


def _levels_named(args: list[str]) -> str:
    """The levels of the tasks named by suite node ids (`...::test_task[L2-...]`), comma separated;
    a usage error naming the argument that names no task."""
    from .tasks import LEVELS

    levels = set()
    for arg in args:
        label = arg.partition("::")[2].partition("[")[2].rpartition("]")[0]
        level = parse_label(label)[0].split("-")[0]
        if level not in LEVELS:
            raise pytest.UsageError(f"{arg}: the DiffBench suite needs --diffbench-level, or node ids of tasks "
                                    f"({SUITE_NODE_PATH}::test_task[<task id>], the id starting with a level: "
                                    f"{', '.join(LEVELS)})")
        levels.add(level)
    return ",".join(sorted(levels))


def _point_args_at_suite(config) -> list[str]:
    """Arguments naming the suite, pointed at this installation's suite file (pytest would not find
    `pytest_diffbench/suite.py` relative to the working folder); returns them as given."""
    named = []
    for i, arg in enumerate(config.args):
        pointed = suite_argument(arg, config.invocation_params.dir)
        if pointed is not None:
            named.append(arg)
            config.args[i] = pointed
    return named


@pytest.hookimpl(wrapper=True)
def pytest_cmdline_main(config):
    """With -n and --dist left at its default, a diffbench session distributes with loadgroup, so
    each family's tasks run on one worker (pytest_xdist_make_scheduler); this wrapper runs before
    pytest-xdist's hook, which would turn the unset --dist into `load`."""
    wanted = (config.getoption("diffbench_level", None) or config.getini("diffbench_level").strip()
              or any(suite_argument(a, config.invocation_params.dir) for a in config.args))
    if (wanted and getattr(config, "workerinput", None) is None and getattr(config.option, "numprocesses", None)
            and getattr(config.option, "dist", None) == "no" and not getattr(config.option, "distload", False)):
        config.option.dist = "loadgroup"
    return (yield)


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """Under --dist loadgroup a diffbench session's tasks are grouped by family
    (pytest_diffbench.distribution)."""
    session = _session(config)
    if session is None or config.getoption("dist", "no") != "loadgroup":
        return None
    from .distribution import family_scheduler

    return family_scheduler(config, log, lambda task_id: getattr(session.by_id.get(task_id), "family", None))


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    apply_settings(config)
    _register_markers(config)
    suite_args = _point_args_at_suite(config)
    if not config.getoption("diffbench_level"):
        if not suite_args:
            if config.getoption("diffbench_shard"):
                raise pytest.UsageError("--diffbench-shard: shards of what? Select the tasks with --diffbench-level "
                                        "(or the suite's node ids)")
            return
        # node ids printed by an earlier session, given back without --diffbench-level: their levels
        config.option.diffbench_level = _levels_named(suite_args)
    tasks, all_ids, levels, tasks_dir = _load_tasks(config)
    backend = _check_sandbox(config)
    seed_mode(config)  # a bad $DIFFBENCH_SEEDS stops the session here
    warm_start_setting(config)  # ... and a bad $DIFFBENCH_WARM_START
    session = DiffbenchSession(config, tasks, levels)
    session.tasks_dir = tasks_dir
    session.shard = _shard_option(config)
    session.resolve_session_profile()
    _protect_harness_files(session, backend)
    config.stash[SESSION_KEY] = session
    config.pluginmanager.register(session, "diffbench-session")
    if config.args_source != pytest.Config.ArgsSource.ARGS:
        config.args[:] = [str(SUITE_FILE)]
    elif not suite_args:  # other paths given: the suite runs beside them
        config.args.append(str(SUITE_FILE))
    if config.getoption("diffbench_exit") == settings.EXIT_HARNESS_ONLY:
        config.pluginmanager.register(HarnessOnlyExit(), "diffbench-harness-only-exit")
    from .candidates import CandidatesGenerator, ReferenceGenerator

    config.pluginmanager.register(ReferenceGenerator(), "diffbench-reference-generator")
    path = config.getoption("diffbench_candidates")
    if path and session.generate_only:
        raise pytest.UsageError("--diffbench-generate-only and --diffbench-candidates exclude each other: the "
                                "candidates of a file are already written")
    if path:
        try:
            generator = CandidatesGenerator(Path(path), all_ids)
        except ValueError as exc:
            raise pytest.UsageError(f"--diffbench-candidates: {exc}") from None
        config.pluginmanager.register(generator, "diffbench-candidates-generator")
        session.candidates = generator


def _shard_option(config):
    """--diffbench-shard as a shards.Shard (None without it); a usage error saying what is wrong."""
    from .shards import ShardError, parse_shard

    text = config.getoption("diffbench_shard")
    if not text:
        return None
    try:
        return parse_shard(text)
    except ShardError as exc:
        raise pytest.UsageError(f"--diffbench-shard: {exc}") from None


def _session(config) -> DiffbenchSession | None:
    return config.stash.get(SESSION_KEY, None)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):  # xdist controller -> worker: one run directory and one profile for all
    session = _session(node.config)
    if session is not None:
        node.workerinput["diffbench_out"] = str(session.run_dir)
        node.workerinput["diffbench_resume"] = session.resume
        # the profile the controller resolved, in its serialized form (each worker applies its device)
        if session.profile is not None:
            node.workerinput["diffbench_profile"] = session.profile.to_json()
        if session._setup_error:
            node.workerinput["diffbench_profile_error"] = session._setup_error


def pytest_pycollect_makemodule(module_path, parent):
    """The suite module with the same node id wherever the package is installed (outside the
    rootdir pytest would give it an empty path: `::test_task[...]`, which selects nothing)."""
    if module_path == SUITE_FILE:
        return pytest.Module.from_parent(parent, path=module_path, nodeid=SUITE_NODE_PATH)
    return None


def pytest_generate_tests(metafunc):
    if metafunc.definition.name != "test_task" or Path(str(metafunc.definition.path)) != SUITE_FILE:
        return
    session = _session(metafunc.config)
    params = []
    for task in session.tasks if session else []:
        variants = session.candidates.variants.get(task.id) if session.candidates else None
        marks = [getattr(pytest.mark, name) for name in task.markers]  # registered in pytest_configure
        for candidate_id in variants or [None]:
            label = task_label(task.id, candidate_id)
            params.append(pytest.param(task, candidate_id, id=label, marks=marks))
    metafunc.parametrize(["diffbench_task", "diffbench_candidate_id"], params)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    """--diffbench-shard: this shard's part of the items left after -k, -m and node ids (trylast:
    after pytest's own deselection; pytest_diffbench.shards)."""
    ds = _session(config)
    if ds is not None and ds.shard is not None:
        ds.select_shard(config, items)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """A shard left without tasks (more shards than selected tasks) has run its part: exit 0, not 5."""
    ds = _session(session.config)
    if (ds is None or ds.shard is None or exitstatus != pytest.ExitCode.NO_TESTS_COLLECTED
            or getattr(session.config, "workerinput", None) is not None):
        return
    record = ds.shard_record()
    if record is not None and record["selected"] and not record["labels"]:
        session.exitstatus = pytest.ExitCode.OK


def pytest_report_header(config):
    session = _session(config)
    if session is None:
        return None
    counts = ", ".join(f"{lvl} {sum(t.level == lvl for t in session.tasks)}" for lvl in sorted(session.levels))
    generator = session.generator_id()
    generator = "reference (gold solutions)" if generator == "reference" else generator
    profile = session.profile
    if profile is None:
        return [f"diffbench: {len(session.tasks)} tasks at these levels ({counts}); generator: {generator}",
                f"diffbench: profile unavailable: {session._setup_error}; run dir: {session.run_dir}"]
    device = profile.device if profile.device == "cpu" else f"{profile.device} ({profile.device_name})"
    speed = f"{profile.speed_method} ({profile.repeats} timed call{'s' if profile.repeats != 1 else ''}" + \
        (", proved by replay)" if profile.replay else ")")
    warm = profile.limits.warm_start
    if not config.getoption("diffbench_profile") and warm_start_setting(config) == "auto":
        warm += " (auto)"
    source = f"from {config.getoption('diffbench_profile')}" if config.getoption("diffbench_profile") else "resolved"
    return [f"diffbench: {len(session.tasks)} tasks at these levels ({counts}); generator: {generator}",
            f"diffbench: profile {profile.name} ({source}): models: {profile.zoo} ({profile.zoo_detail}); "
            f"device: {device}; speed: {speed}; threads: {profile.threads}; "
            f"quality: {profile.quality_method}; sandbox: {_sandbox_line(profile.limits.isolation)}; "
            f"seeds: {_seeds_line(profile.seeds, profile.seed_scope)}; warm start: {warm}; run dir: {session.run_dir}",
            f"diffbench: kernel memory of the runs (socket buffers, ...): {memcg.describe()}; "
            f"their CPU time: {memcg.describe_cpu()}"]


def pytest_report_collectionfinish(config, items):
    """The tasks that will run: the header counts the levels' tasks before -k and deselection."""
    if _session(config) is None:
        return None
    levels: dict[str, int] = {}
    for item in items:
        task = getattr(item, "callspec", None) and item.callspec.params.get("diffbench_task")
        if task is not None:
            levels[task.level] = levels.get(task.level, 0) + 1
    counts = ", ".join(f"{lvl} {n}" for lvl, n in sorted(levels.items())) or "none"
    plan = _session(config).shard_plan
    if plan is not None:
        share = 100.0 * plan.cost / (plan.total_cost or 1)
        return (f"diffbench: {sum(levels.values())} tasks selected ({counts}): shard {plan.shard} of "
                f"{len(plan.selected)} selected, {share:.0f}% of their expected cost")
    return f"diffbench: {sum(levels.values())} tasks selected ({counts})"


def _check_sandbox(config) -> str:
    """The isolation backend candidates will run under; a usage error (the session stops before any
    candidate runs) where `auto` finds no strong backend or the named one cannot run here."""
    from .sandbox import SandboxUnavailable, resolve_isolation

    try:
        return resolve_isolation(config.getoption("diffbench_sandbox"))
    except (SandboxUnavailable, ValueError) as exc:
        raise pytest.UsageError(f"--diffbench-sandbox: {exc}") from None


def _protect_harness_files(session, backend: str) -> None:
    """Register what no candidate may read (sandbox.protect) and stop the session (a usage error,
    before any candidate runs) where the candidates' readable paths, which the environment and the
    zoo's settings add to, would show one of them under the strong `backend` (the session's,
    resolved; the profile's where it is resolved, which a GA child session takes from its parent)."""
    from .evaluate import child_env
    from .sandbox import STRONG_ISOLATIONS, SandboxUnavailable, check_protected, protect, scrubbed_env

    protect({"the baseline cache (its key, baselines, the LLM cache)": session.cache_dir,
             "the run directory": session.run_dir, "the task files (golds, calibrations)": session.tasks_dir,
             "the rootdir": session.config.rootpath, "your home": Path.home()})
    profile = session.profile
    if (profile.limits.isolation if profile is not None else backend) not in STRONG_ISOLATIONS:
        return
    try:
        # without a profile (not resolved yet, or unavailable) the environment's own paths still count
        check_protected(child_env(profile) if profile is not None else scrubbed_env(os.environ))
    except SandboxUnavailable as exc:
        raise pytest.UsageError(f"--diffbench-sandbox: {exc}") from None


def _sandbox_line(backend: str) -> str:
    """The profile's (resolved) sandbox backend, weak ones named as such."""
    from .sandbox import WEAK_ISOLATIONS

    if backend in WEAK_ISOLATIONS:
        return (f"{backend.upper()} - WEAK, NAMED EXPLICITLY: candidate code can read and write everything "
                f"the pytest user can (golds, baseline cache, run directory, your files)")
    return backend


def seed_mode(config) -> str:
    """The seed mode of the session: --diffbench-seeds, else $DIFFBENCH_SEEDS, else secret; a usage
    error for an unknown value of the variable."""
    mode = config.getoption("diffbench_seeds", None) or os.environ.get("DIFFBENCH_SEEDS") or SECRET_SEEDS
    if mode not in SEED_MODES:
        raise pytest.UsageError(f"$DIFFBENCH_SEEDS: {mode!r} is not one of {', '.join(SEED_MODES)}")
    return mode


def _seeds_line(mode: str, scope: str) -> str:
    if mode == PUBLIC_SEEDS:
        return ("PUBLIC - WEAK, NAMED EXPLICITLY: task seed + i, the same for everyone and predictable from the "
                "repository, so a candidate can precompute its images (reproducible figures only)")
    if mode == SHARED_SEEDS:
        return (f"SHARED - WEAK, NAMED EXPLICITLY: per-user key, scope {scope}, one set per workload for every "
                f"candidate, so a candidate can carry the verdict's noise out in its images for a later one")
    return f"secret (per-user key, scope {scope}{'; the verdict seeds per candidate' if scope == VERDICT_SCOPE else ''})"


# -- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def diffbench_session(request) -> DiffbenchSession:
    session = _session(request.config)
    if session is None:
        pytest.skip("DiffBench is not enabled (use --diffbench-level)")
    return session


@pytest.fixture
def diffbench_profile_task(diffbench_task, diffbench_session):
    """The task as posed on this hardware profile: L4/L5 get their calibrated target and gold.

    Without a calibration for the profile, L4/L5 tasks are skipped with the command that makes one;
    a task whose file states its target already (e.g. one written by a user) needs none.
    """
    task = diffbench_task
    if task.level not in ("L4", "L5") or not task.needs_calibration:
        return task
    name = diffbench_session.evaluator().profile.name
    try:
        from .calibration import CalibrationError, calibration_command
    except ImportError:
        pytest.skip(f"{task.id}: this installation has no L4/L5 calibration support")

    calibration = diffbench_session.calibration(name)
    command = calibration_command(name, diffbench_session.tasks_dir)
    if calibration is None:
        pytest.skip(f"no L4/L5 calibration for hardware profile {name!r}; create one with: {command}")
    try:
        return calibration.apply(task)
    except CalibrationError as exc:
        pytest.skip(f"{task.id}: {exc}; recalibrate with: {command}")


@pytest.fixture
def diffbench_candidate(diffbench_profile_task, diffbench_candidate_id, diffbench_session, request) -> Candidate:
    """The code under test, from the first generator that answers (hook pytest_diffbench_generate).

    Items of a manifest with several candidates per task (`<task id>@<candidate id>`) take their
    code straight from the manifest.
    """
    task = diffbench_profile_task
    if diffbench_candidate_id is not None:
        return diffbench_session.candidates.candidate_for(task, diffbench_candidate_id)
    context = diffbench_session.generation_context(task, task.id)
    log.info("%s: generating the candidate (%s)", task.id, diffbench_session.generator_id())
    candidate = request.config.hook.pytest_diffbench_generate(task=task, config=request.config, context=context)
    if candidate is None:
        raise HarnessError(f"no generator produced a candidate for {task.id}")
    log.info("%s: candidate from %s%s", task.id, candidate.source, "" if candidate.code else " (no code)")
    return candidate


@pytest.fixture
def diffbench_evaluation(diffbench_profile_task, diffbench_candidate_id, diffbench_session, request) -> TaskResult:
    """Runs the candidate and the three stages; the test function asserts on the result.

    With resume on, a complete result from an earlier session in the same run directory (same
    profile) is reused: neither the generator (no LLM call) nor the evaluation runs again.
    """
    task = diffbench_profile_task
    if diffbench_session.generate_only:
        generate_only(task, request)
    evaluator = diffbench_session.evaluator()
    label = task_label(task.id, diffbench_candidate_id)
    known_code = None
    if diffbench_session.candidates is not None:  # a file read, no generator run
        known_code = request.getfixturevalue("diffbench_candidate").code or ""
    fingerprint = diffbench_session.resume_fingerprint(task, known_code)
    result = (diffbench_session.previous_result(label, evaluator.profile.name, fingerprint)
              if diffbench_session.resume else None)
    if result is not None:
        log.info("%s: the complete result of an earlier session is reused (resume)", label)
    else:
        candidate = request.getfixturevalue("diffbench_candidate")
        result = evaluator.evaluate(task, candidate, task.reference, task.gold, label=label,
                                    ablations=ablation_codes(task, diffbench_session.tasks_dir))
        if result.complete:
            diffbench_session.write_resume(label, fingerprint)
    request.node.stash[RESULT_KEY] = result
    for name, value in report.junit_properties(result):
        request.node.user_properties.append((name, value))
    request.config.hook.pytest_diffbench_evaluated(task=task, result=result, record=result.to_json(),
                                                    config=request.config)
    return result


def generate_only(task, request) -> None:
    """--diffbench-generate-only: the task's candidate, put on the setup report for the controller
    to write (candidates.jsonl), and the item skipped: nothing is evaluated."""
    from .candidates import generated_entry

    candidate = request.getfixturevalue("diffbench_candidate")
    entry = generated_entry(task.id, candidate)
    if entry is None:
        pytest.skip(f"generate-only: no code for {task.id}: {candidate.reason or 'the generator gave none'}")
    request.node.stash[GENERATED_KEY] = entry
    pytest.skip(f"generate-only: {task.id}'s candidate written, not evaluated")


# -- reporting -----------------------------------------------------------------------------------

#: beside each result.json: what it was computed from (see DiffbenchSession.resume_fingerprint)
RESUME_FILE = "resume.json"
#: attributes of the suite's test reports, carried to the xdist controller by pytest's report
#: serialization: the item's task (task_id, label, level) on every phase, the TaskResult's JSON
#: form on the call report
REPORT_ITEM = "diffbench_item"
REPORT_RESULT = "diffbench_result"
#: --diffbench-generate-only: the candidates.jsonl entry of the item, on its setup report
REPORT_GENERATED = "diffbench_generated"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    params = getattr(getattr(item, "callspec", None), "params", {})
    task = params.get("diffbench_task")
    if task is not None and _session(item.config) is not None:
        setattr(rep, REPORT_ITEM, {"task_id": task.id, "label": task_label(task.id, params.get("diffbench_candidate_id")),
                                   "level": task.level})
        result = item.stash.get(RESULT_KEY, None)
        if result is not None and rep.when == "call":
            setattr(rep, REPORT_RESULT, result.to_json())
        generated = item.stash.get(GENERATED_KEY, None)
        if generated is not None and rep.when == "setup":
            setattr(rep, REPORT_GENERATED, generated)
    return rep


def report_row(rep) -> TaskResult | None:
    """The task's result as the summary counts it: from the call report, or a harness error from a
    failed setup or from pytest-xdist's report of a worker that died running the item; None for
    other reports. The call's outcome is the verdict's (suite.test_task asserts it)."""
    item = getattr(rep, REPORT_ITEM, None) or _crashed_worker_item(rep)
    if item is None:
        return None
    if rep.failed and rep.when not in ("call", "teardown"):
        return TaskResult.harness_failure(item["task_id"], item["label"], item["level"], str(rep.longrepr)[-500:])
    if rep.when != "call":
        return None
    document = getattr(rep, REPORT_RESULT, None)
    if document is None:
        return TaskResult.harness_failure(item["task_id"], item["label"], item["level"],
                                          "no result reached the summary: " + str(rep.longrepr or "")[-400:])
    try:
        return TaskResult.from_json(document)
    except ValueError as exc:
        return TaskResult.harness_failure(item["task_id"], item["label"], item["level"], f"unreadable result: {exc}")


def _crashed_worker_item(rep) -> dict | None:
    """The task of pytest-xdist's report of a worker that died running the item (when "???"): the
    controller makes that report itself, without the worker's attributes, so the task comes from
    the node id. None for any other report."""
    if rep.when != "???" or "test_task[" not in rep.nodeid:
        return None
    label = rep.nodeid.rsplit("[", 1)[1].rstrip("]")
    task_id, _ = parse_label(label)
    return {"task_id": task_id, "label": label, "level": task_id.split("-")[0]}


class HarnessOnlyExit:
    """--diffbench-exit=harness-only: a session whose only failures are tasks the model failed
    exits 0; a harness error (a setup error, a harness verdict, a crashed worker) or a failure
    outside the benchmark keeps pytest's exit code, and so do all other exit codes (5: nothing
    collected)."""

    def __init__(self):
        self.model_failures = 0
        self.other_failures = 0

    def pytest_runtest_logreport(self, report):
        if not report.failed:
            return
        result = report_row(report) if report.when == "call" else None
        if result is not None and result.verdict.category != HARNESS:
            self.model_failures += 1
        else:
            self.other_failures += 1

    def pytest_collectreport(self, report):
        if report.failed:
            self.other_failures += 1

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session):
        if session.exitstatus == pytest.ExitCode.TESTS_FAILED and self.model_failures and not self.other_failures:
            session.exitstatus = pytest.ExitCode.OK
