"""Untrusted code and faults: adversarial candidates, each stopped with a clear category.

Two kinds of attack, both through the real sandbox (`pytest_diffbench.sandbox.run_job`):

* the harness-level attacks in tests/adversarial/ (fake speed, fake results, tampering, faults)
  run in the real child (`pytest_diffbench.child`) as candidates built from a toy torch pipeline
  (tests/adversarial/_toy.py) plus the attack; each file's docstring says what it does and, in
  its `expect:` line, how it must end. They run concurrently in one module fixture (a torch child
  starts in seconds; the tiny zoo's diffusers children would take much longer);
* the process-level attacks (snooping for secrets in the parent's environment and in files,
  writing outside the working directory, network, fork bombs, filling /tmp, escaping the
  process group, forged result streams) run in tests/sandbox_probe_child.py, the torch-free
  stand-in child, so that they can look at everything directly.

Categories as the evaluation reports them: `stages.runtime_failure` (a sandbox status or a
candidate error: category runtime) and `stages.key_attribute_mismatches` against the honest
toy's attributes (category key_attribute).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
import types
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_diffbench import sandbox, stages
from pytest_diffbench.baselines import get_or_measure
from pytest_diffbench.sandbox import SandboxLimits, available_isolations, run_job, scrubbed_env
from pytest_diffbench.tasks import Expect

REPO = Path(__file__).resolve().parent.parent
ATTACKS = Path(__file__).resolve().parent / "adversarial"
TOY = (ATTACKS / "_toy.py").read_text()
PROBE = "tests.sandbox_probe_child"
CANARY = "sk-diffbench-canary-7f3a9c"  # planted as API keys and in secret files; must never come back
WORKERS = 4

BWRAP = "bwrap" in available_isolations()
needs_bwrap = pytest.mark.skipif(not BWRAP, reason="bubblewrap (bwrap) is not usable here: no file system isolation")
STRONG = [b for b in available_isolations() if b != "none"]

TOY_EXPECT = Expect(pipeline_class="ToyPipeline", model_id="toy/toy-diffusion", scheduler="ToyScheduler", steps=4,
                    dtype="float32", methods={})
TOY_BATCH = {"kind": "text2img", "prompts": ["a red cube", "a blue ball"], "class_ids": None, "images": None,
             "strength": None, "seeds": [0, 1], "height": 16, "width": 16, "guidance_scale": 7.5,
             "num_inference_steps": 4}


@dataclass(frozen=True)
class Attack:
    name: str
    doc: str
    expect: str
    job: dict
    code: str


def _attack(path: Path) -> Attack:
    source = path.read_text()
    doc = source.split('"""')[1]
    expect = re.search(r"^expect: (.+)$", doc, re.M).group(1).strip()
    job = re.search(r"^job: (.+)$", doc, re.M)
    return Attack(path.stem, doc.strip().splitlines()[0], expect, json.loads(job.group(1)) if job else {},
                  TOY + "\n\n# ---- the attack (tests/adversarial/" + path.name + ") ----\n" + source)


ALL_ATTACKS = {a.name: a for a in map(_attack, sorted(ATTACKS.glob("[!_]*.py")))}


def secret_env() -> dict:
    """The pytest process's environment plus planted credentials (what a user's shell holds)."""
    return {**os.environ, "OPENAI_API_KEY": CANARY, "ANTHROPIC_API_KEY": CANARY, "HF_TOKEN": CANARY,
            "AWS_SECRET_ACCESS_KEY": CANARY, "GITHUB_TOKEN": CANARY, "DIFFBENCH_CANARY": CANARY}


def run_toy(attack: Attack, folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    code_path = folder / "candidate.py"
    code_path.write_text(attack.code)
    options = dict(attack.job)
    limits = SandboxLimits(timeout_s=options.pop("timeout_s", 180.0), memory_mb=options.pop("memory_mb", 4096),
                           max_processes=options.pop("max_processes", 256))
    job = {"task_id": f"toy-{attack.name}", "role": "candidate", "code_path": str(code_path),
           "out_dir": str(folder / "images"), "device": "cpu", "dtype": "float32", "batch": TOY_BATCH,
           "repeats": 1, "count_flops": False, "threads": 1, **options}
    start = time.monotonic()
    outcome = run_job(job, env=scrubbed_env(secret_env()), limits=limits, harness_dir=folder / "sandbox")
    return outcome, time.monotonic() - start


def live_children(pid: int) -> set[int]:
    out = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:
            continue
        state, ppid = stat[stat.rfind(")") + 2:].split()[:2]
        if int(ppid) == pid and state != "Z":
            out.add(int(entry))
    return out


def env_now() -> dict:
    return {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}


@pytest.fixture(scope="module")
def worker_state():
    return {"env": env_now(), "cwd": os.getcwd(), "perf_counter": time.perf_counter,
            "children": live_children(os.getpid())}


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory, worker_state):
    """Every attack of tests/adversarial/ in its own sandboxed real child, WORKERS at a time."""
    base = tmp_path_factory.mktemp("adversarial")
    order = sorted(ALL_ATTACKS.values(), key=lambda a: -a.job.get("timeout_s", 0))  # the slow ones first
    order.append(Attack("honest_again", "the honest toy again, after the attacks have started",
                        "ok", ALL_ATTACKS["honest"].job, ALL_ATTACKS["honest"].code))
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        futures = {a.name: pool.submit(run_toy, a, base / a.name) for a in order}
        runs = {name: (*future.result(), base / name) for name, future in futures.items()}
    return runs


def judged(outcome, gold_attributes) -> tuple[str | None, str]:
    """(category, message) as the evaluation would report them at stage 1."""
    failure = stages.runtime_failure(outcome.status, outcome.detail, outcome.result)
    if failure:
        return stages.RUNTIME, failure
    mismatches = stages.key_attribute_mismatches(TOY_EXPECT, "L1", outcome.result.get("attributes") or {},
                                                 gold_attributes)
    if mismatches:
        return stages.KEY_ATTRIBUTE, "; ".join(map(str, mismatches))
    return None, "passed stage 1"


@pytest.fixture(scope="module")
def honest(toy_runs):
    outcome = toy_runs["honest"][0]
    assert outcome.status == "ok" and outcome.result["status"] == "ok", (outcome.detail, outcome.result,
                                                                          outcome.stderr_tail)
    return outcome.result


# ------------------------------------------------------------------------------------------------
# harness-level attacks, real child


def test_the_honest_toy_passes_every_check(honest):
    assert honest["attributes"]["steps"] == {"requested": [4], "denoiser_calls": [4]}
    assert honest["flops"]["total"] > 0 and honest["flops"]["denoiser"] == honest["flops"]["total"]
    assert honest["deterministic"] is True
    timing = honest["timing"]
    assert len(timing["parent_calls_s"]) == len(timing["calls_s"]) == 1  # the parent timed the call too


@pytest.mark.parametrize("name", sorted(set(ALL_ATTACKS) - {"honest"}))
def test_attack_is_stopped(name, toy_runs, honest):
    attack = ALL_ATTACKS[name]
    outcome, _, folder = toy_runs[name]
    category, message = judged(outcome, honest["attributes"])
    context = f"{name}: {attack.doc}\n{category}: {message}\nstderr: {outcome.stderr_tail[-1500:]}"
    spec = attack.expect
    if spec == "ok":
        assert category is None and outcome.result["status"] == "ok", context
    elif spec.startswith("error "):
        m = re.fullmatch(r"error (\w+) in (\w+): (.+)", spec)
        assert category == stages.RUNTIME, context
        error = (outcome.result or {}).get("error") or {}
        assert (error.get("type"), error.get("phase")) == (m.group(1), m.group(2)), context
        assert m.group(3) in error.get("message", ""), context
    elif spec.startswith("status "):
        m = re.fullmatch(r"status (\w+): (.+)", spec)
        assert category == stages.RUNTIME and outcome.status == m.group(1), context
        assert m.group(2) in outcome.detail, context
    elif spec.startswith("key_attribute: "):
        assert category == stages.KEY_ATTRIBUTE and spec.split(": ", 1)[1] in message, context
    else:
        raise AssertionError(f"bad expect line in {name}: {spec!r}")
    # ... and harms nothing: no process left, no secret in anything that comes back, the harness's
    # folder holds only what the parent wrote
    assert not outcome.extra.get("leftover_pids"), context
    returned = json.dumps(outcome.result) + outcome.stdout_tail + outcome.stderr_tail
    returned += (folder / "sandbox" / "stdout.log").read_text(errors="replace")
    returned += (folder / "sandbox" / "stderr.log").read_text(errors="replace")
    assert CANARY not in returned, context
    written = sorted(p.name for p in (folder / "sandbox").iterdir())
    assert set(written) <= {"job.json", "result.json", "stdout.log", "stderr.log"}, written
    if outcome.status != "ok" or outcome.result["status"] != "ok":
        assert not (folder / "images").exists() or not any((folder / "images").iterdir()), context


def test_a_written_result_file_never_reaches_the_harness(toy_runs):
    """write_result_file wrote result.json and images/000.png next to the job file, as it sees it:
    that path is in its private /tmp; the harness's folder outside holds what the parent wrote."""
    outcome, _, folder = toy_runs["write_result_file"]
    assert outcome.status == "no_result"
    assert not (folder / "sandbox" / "result.json").exists() and not (folder / "sandbox" / "images").exists()


def test_counts_rewritten_in_the_childs_final_document_are_the_parents(toy_runs, honest):
    """rewrite_counts_late multiplied `num_images` by 50 and divided the FLOPs per image by 100
    after the child's document was final (red team, session 13: with the count multiplied, the
    parent's CPU seconds per image shrank with it and U was forged without bound). The parent
    sets both from what it knows: the images it received, the FLOP total over them."""
    outcome, _, folder = toy_runs["rewrite_counts_late"]
    assert "forged the counts" in (folder / "sandbox" / "stderr.log").read_text(), outcome.stderr_tail  # it ran
    result = outcome.result
    assert result["num_images"] == len(TOY_BATCH["seeds"]) == len(result["images"])
    assert result["flops"]["per_image"] == result["flops"]["total"] / len(TOY_BATCH["seeds"])
    timing = result["timing"]
    slower = max(timing["calls_s"][0], timing["parent_calls_s"][0])  # the child's timer or the parent's clock
    assert timing["latency_ms_per_image"] == 1000 * slower / len(TOY_BATCH["seeds"])


def test_adversarial_summary(toy_runs, honest):
    """The attacks and how they ended (printed with -rP; figures for the README)."""
    rows = []
    for name, attack in sorted(ALL_ATTACKS.items()):
        outcome, seconds, _ = toy_runs[name]
        category, message = judged(outcome, honest["attributes"])
        rows.append(f"{name:22s} {str(category or 'passes'):14s} {seconds:6.1f}s  {message[:110]}")
    stopped = sum(1 for r in rows if " runtime " in r or " key_attribute " in r)
    print(f"\n{len(rows)} candidates, {stopped} stopped:\n" + "\n".join(rows))
    assert stopped == len(rows) - sum(1 for a in ALL_ATTACKS.values() if a.expect == "ok")


# ------------------------------------------------------------------------------------------------
# process-level attacks, stand-in child


def probe(tmp_path, action, limits=None, env_base=None, readable=(), **job):
    env = scrubbed_env(env_base if env_base is not None else secret_env())
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env["PYTHONPATH"]
    return run_job({"action": action, **job}, env=env,
                   limits=limits or SandboxLimits(timeout_s=60, memory_mb=2048), harness_dir=tmp_path / "h",
                   module=PROBE, readable=[REPO / "tests", *readable])


HELPER = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    from pytest_diffbench.sandbox import SandboxLimits, run_job, scrubbed_env
    env = scrubbed_env(os.environ)
    env["PYTHONPATH"] = {repo!r} + os.pathsep + env["PYTHONPATH"]
    job = json.loads(sys.argv[1])
    job["parent_pid"] = os.getpid()
    out = run_job(job, env=env, limits=SandboxLimits(timeout_s=60, memory_mb=2048, isolation=sys.argv[2]),
                  harness_dir=Path(sys.argv[3]), module={probe!r}, readable=[Path({repo!r}) / "tests"])
    print(json.dumps({{"status": out.status, "detail": out.detail, "result": out.result,
                      "isolation": out.isolation, "stderr": out.stderr_tail}}))
""")


def run_from_secret_parent(tmp_path, job: dict, isolation: str) -> dict:
    """run_job from a helper process whose own environment holds the planted keys and whose HOME
    holds credential files: the child's parent, as the pytest process is in a real run."""
    home = tmp_path / "home"
    for rel in (".netrc", ".cache/huggingface/token", ".aws/credentials", ".config/diffbench/keys.env"):
        (home / rel).parent.mkdir(parents=True, exist_ok=True)
        (home / rel).write_text(f"password {CANARY}\n")
    env = {**secret_env(), "HOME": str(home)}
    proc = subprocess.run([sys.executable, "-c", HELPER.format(repo=str(REPO), probe=PROBE), json.dumps(job),
                           isolation, str(tmp_path / "h")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("isolation", STRONG)
def test_no_secret_from_the_parents_environment_or_memory(tmp_path, isolation):
    out = run_from_secret_parent(tmp_path, {"action": "snoop"}, isolation)
    assert out["status"] == "ok", out
    attempts = out["result"]["attempts"]
    assert CANARY not in json.dumps(out), "a planted key reached the candidate"
    assert not attempts["parent_environ"]["ok"] and not attempts["parent_mem_maps"]["ok"]  # not even visible
    visible = attempts["all_environ"]["value"]
    assert len(visible) <= 3, visible  # the sandbox's own few processes only
    assert out["result"]["env"].keys().isdisjoint({"OPENAI_API_KEY", "HF_TOKEN", "DIFFBENCH_CANARY"})


@needs_bwrap
def test_no_secret_from_files(tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    files = {"run_dir_record": run_dir / "other-task" / "result.json",
             "baseline_image": cache / "baselines" / "ab" / "abcd" / "images" / "000.png",
             "baseline_manifest": cache / "baselines" / "ab" / "abcd" / "manifest.json"}
    for path in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(CANARY)
    files.update({"netrc": tmp_path / "home" / ".netrc", "hf_token": tmp_path / "home" / ".cache/huggingface/token",
                  "aws": tmp_path / "home" / ".aws/credentials", "repo_readme": REPO / "README.md",
                  "repo_tasks": REPO / "tasks" / "README.md", "shadow": Path("/etc/shadow")})
    out = run_from_secret_parent(tmp_path, {"action": "snoop", "files": {k: str(v) for k, v in files.items()}}, "bwrap")
    assert out["status"] == "ok", out
    attempts = out["result"]["attempts"]
    for name in files:
        assert not attempts[name]["ok"], (name, attempts[name])
        assert "No such file" in attempts[name]["error"], (name, attempts[name])  # not there at all
    assert attempts["home_listing"]["ok"] and attempts["home_listing"]["value"] == []  # a private, empty home
    assert CANARY not in json.dumps(out)


@needs_bwrap
def test_no_writes_outside_the_private_tmp(tmp_path, tiny_zoo_dir):
    run_dir, cache = tmp_path / "run", tmp_path / "cache" / "baselines"
    for folder in (run_dir, cache):
        folder.mkdir(parents=True)
    victim = cache / "manifest.json"
    victim.write_text("{}")
    code = tmp_path / "h" / "candidate.py"
    code.parent.mkdir(parents=True)
    code.write_text("# the candidate itself\n")
    targets = {"repo_new_file": REPO / "tests" / "adversarial" / "PWNED", "repo_package": REPO / "pytest_diffbench" / "PWNED",
               "run_dir": run_dir / "PWNED", "baseline_cache": cache / "PWNED", "zoo": Path(tiny_zoo_dir) / "PWNED",
               "own_code": code, "job_file": tmp_path / "h" / "job.json", "home": Path.home() / "PWNED",
               "usr": Path("/usr/PWNED"), "etc_hosts": Path("/etc/hosts")}
    repo_canary = ATTACKS / f".delete-me-{os.getpid()}"  # made for this test, so deleting it would harm nothing
    repo_canary.write_text("canary")
    deletes = {"baseline_manifest": victim, "own_code": code, "repo_file": repo_canary}
    before = {p: p.stat().st_mtime_ns for p in (victim, code, repo_canary, ATTACKS / "_toy.py", Path("/etc/hosts"))}
    try:
        out = probe(tmp_path, "write_around", readable=[tiny_zoo_dir, repo_canary], code_path=str(code),
                    write={k: str(v) for k, v in targets.items()}, delete={k: str(v) for k, v in deletes.items()})
        assert repo_canary.exists()
    finally:
        repo_canary.unlink(missing_ok=True)
        before.pop(repo_canary)
    assert out.status == "ok", (out.detail, out.stderr_tail)
    attempts = out.result["attempts"]
    for name in list(targets) + list(deletes):
        key = f"write:{name}" if name in targets else f"delete:{name}"
        for k in ([f"write:{name}"] if name in targets else []) + ([f"delete:{name}"] if name in deletes else []):
            assert not attempts[k]["ok"], (k, attempts[k])
        assert key in attempts
    assert attempts["write:tmp"]["ok"] and attempts["write:cwd"]["ok"]  # its private /tmp is writable
    for path in targets.values():
        if path.name == "PWNED":
            assert not path.exists(), path
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert code.read_text() == "# the candidate itself\n"


@pytest.fixture(scope="module")
def tiny_zoo_dir():
    """A folder the child may read but must not write (the tiny zoo when it is there; else one of
    the repository's that the sandbox shows when named: not fixtures/, which it never shows)."""
    zoo = os.environ.get("DIFFBENCH_ZOO_DIR")
    if zoo and Path(zoo).is_dir():
        return Path(zoo)
    return REPO / "docs"


@pytest.mark.skipif(not STRONG, reason="no namespace isolation on this machine")
@pytest.mark.parametrize("isolation", STRONG)
def test_no_network(tmp_path, isolation):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        out = probe(tmp_path, "network", port=server.getsockname()[1],
                    limits=SandboxLimits(timeout_s=60, memory_mb=2048, isolation=isolation))
    finally:
        server.close()
    assert out.status == "ok" and out.network_isolated and out.isolation["network"]
    assert out.result["connected"] is False


def test_fork_bomb_is_killed_and_nothing_survives(tmp_path):
    out = probe(tmp_path, "fork_bomb", limits=SandboxLimits(timeout_s=60, memory_mb=4096, max_processes=64))
    assert out.status == "processes" and "more than 64 processes" in out.detail, (out.status, out.detail)
    assert stages.runtime_failure(out.status, out.detail, out.result).startswith("candidate process processes")
    assert not out.extra.get("leftover_pids")


@pytest.mark.parametrize("action", ["spin", "escape_and_sleep"])
def test_hangs_are_killed_with_everything_they_started(tmp_path, action):
    out = probe(tmp_path, action, limits=SandboxLimits(timeout_s=3, memory_mb=2048))
    # killed soon after the limit: the run's own time (a new zygote's start-up, ~10-25 s under
    # load, comes before it and is not the kill's)
    assert out.status == "timeout" and out.wall_s < 20, (out.status, out.wall_s)
    assert not out.extra.get("leftover_pids"), out.extra  # the setsid() grandchild too


@needs_bwrap
def test_filling_tmp_hits_its_size_limit_not_the_disk(tmp_path):
    out = probe(tmp_path, "fill_tmp", max_bytes=256 << 20, limits=SandboxLimits(timeout_s=60, memory_mb=2048, tmp_mb=64))
    assert out.status == "ok", out.detail
    assert out.result["full"] is True and out.result["written"] <= 64 << 20


@pytest.mark.parametrize("action, status, text", [
    ("memory", "memory", "memory limit"),
    ("segfault", "crashed", "SIGSEGV"),
    ("exit_silently", "no_result", "without sending a result"),
    ("steal_env", "no_result", "without sending a result"),
])
def test_faults_end_with_a_status(tmp_path, action, status, text):
    out = probe(tmp_path, action, limits=SandboxLimits(timeout_s=60, memory_mb=400))
    assert out.status == status and text in out.detail, (out.status, out.detail)
    assert stages.runtime_failure(out.status, out.detail, out.result) == f"candidate process {status}: {out.detail}"
    assert CANARY not in out.stdout_tail + out.stderr_tail + (tmp_path / "h" / "stderr.log").read_text()
    assert not out.extra.get("leftover_pids")


def test_flooding_stdout_and_stderr_keeps_bounded_logs(tmp_path):
    out = probe(tmp_path, "flood_big")
    assert out.status == "ok"
    for name in ("stdout.log", "stderr.log"):
        log = tmp_path / "h" / name
        assert log.stat().st_size < 1 << 20  # of 64 MiB: the head and the tail
        assert "bytes omitted by the sandbox" in log.read_text()
    assert len(out.stdout_tail) <= 8000


@pytest.mark.parametrize("action, status, text", [
    ("garbage", "bad_result", "without the harness's token"),
    ("forged_result", "bad_result", "without the harness's token"),
    ("print_result", "no_result", "without sending a result"),
    ("close_output", "no_result", "without sending a result"),
])
def test_results_only_come_from_the_harness(tmp_path, action, status, text):
    out = probe(tmp_path, action)
    assert (out.status, out.result) == (status, None) and text in out.detail, (out.status, out.detail)
    assert not (tmp_path / "h" / "result.json").exists()


# ------------------------------------------------------------------------------------------------
# the worker's own state; the baseline cache


def test_a_failing_candidate_does_not_poison_the_next_one(toy_runs, worker_state):
    """Every candidate gets a fresh process: after the segfault, the patched libraries and the
    rest (run above), the pytest process is unchanged and the next child runs normally."""
    again, _, folder = toy_runs["honest_again"]
    assert again.status == "ok" and again.result["status"] == "ok"
    first = toy_runs["honest"][2]
    for name in again.result["images"]:
        assert (folder / "images" / name).read_bytes() == (first / "images" / name).read_bytes()
    assert again.result["flops"] == toy_runs["honest"][0].result["flops"]
    # the worker (this pytest process) is as it was before the attacks
    before = worker_state
    assert env_now() == before["env"] and os.getcwd() == before["cwd"]
    assert "candidate" not in sys.modules  # candidate code never ran in this process
    assert time.perf_counter is before["perf_counter"]
    # the worker's idle zygotes (warm start) are the only other children; nothing of a run is left
    # in them (a run leaving a process behind ends its zygote: tests/test_warm_start.py)
    zygotes = {z.proc.pid: z for z in sandbox._IDLE_ZYGOTES}
    assert live_children(os.getpid()) - set(zygotes) <= before["children"], "a child of the worker outlived its run"
    for zygote in zygotes.values():
        table = sandbox._proc_table()
        inside = sandbox._tree(table, zygote.proc.pid, None)
        assert set(inside) <= {zygote.host_pid} | sandbox._ancestors(table, zygote.host_pid), "a run left a process"


@pytest.mark.parametrize("corruption", ["image", "result", "manifest"])
def test_a_corrupted_baseline_entry_is_measured_again(tmp_path, corruption):
    calls = []

    def measure(images_dir: Path) -> dict:
        calls.append(images_dir)
        (images_dir / "000.png").write_bytes(b"\x89PNG fake image " + str(len(calls)).encode())
        return {"status": "ok", "images": ["000.png"], "flops": {"per_image": 100.0 * len(calls)}}

    first = get_or_measure(tmp_path, "k" * 32, measure)
    assert not first.hit and len(calls) == 1
    assert get_or_measure(tmp_path, "k" * 32, measure).hit
    manifest = first.folder / "manifest.json"
    if corruption == "image":
        (first.folder / "images" / "000.png").write_bytes(b"\x89PNG tampered")
    elif corruption == "result":  # a valid manifest whose result was edited (e.g. a cheaper baseline)
        data = json.loads(manifest.read_text())
        data["result"]["flops"]["per_image"] = 1.0
        manifest.write_text(json.dumps(data))
    else:
        manifest.write_text("{truncated")
    again = get_or_measure(tmp_path, "k" * 32, measure)
    assert not again.hit and len(calls) == 2, "a corrupted entry must be measured again, never trusted"
    assert again.result["flops"]["per_image"] == 200.0


# ------------------------------------------------------------------------------------------------
# the child's tripwires, in this process (no candidate code runs here)

from pytest_diffbench.integrity import harness_snapshot, screen_source  # noqa: E402


@pytest.mark.parametrize("code, finding", [
    pytest.param("import time\ntime.perf_counter = lambda: 0.0\n", "replaces time.perf_counter", id='time-patched'),
    pytest.param("from time import perf_counter\nimport time as t\nt.time = perf_counter\n", "replaces time.time", id='time-alias-patched'),
    pytest.param("import torch\ntorch.cuda.synchronize = lambda *a: None\n", "replaces torch.cuda.synchronize", id='cuda-sync-patched'),
    pytest.param("import torch.nn as nn\nnn.Module.__call__ = None\n", "replaces torch.nn.Module.__call__", id='module-call-patched'),
    pytest.param("import torch\nsetattr(torch.cuda, 'synchronize', print)\n", "setattr() on torch.cuda", id='setattr-cuda'),
    pytest.param("import numpy as np\nnp.array_equal = lambda a, b: True\n", "replaces numpy.array_equal", id='numpy-patched'),
    pytest.param("from torch.utils.flop_counter import FlopCounterMode\n", "the FLOP counter", id='flop-counter-import'),
    pytest.param("import torch\nx = torch.utils.flop_counter\n", "the FLOP counter", id='flop-counter-attribute'),
    pytest.param("from torch.utils._python_dispatch import _disable_current_modes\n", "dispatch-mode internals", id='dispatch-modes-import'),
    pytest.param("import torch\nguard = torch._C._DisableTorchDispatch\n", "dispatch-mode internals", id='dispatch-disabled'),
    pytest.param("import sys\nframe = sys._getframe(1)\n", "frame inspection", id='getframe'),
    pytest.param("import inspect\nf = inspect.currentframe().f_back.f_locals\n", "frame inspection", id='frame-locals'),
    pytest.param("import gc\nobjs = gc.get_objects()\n", "garbage collector", id='gc-objects'),
    pytest.param("import sys\nharness = sys.modules['__main__']\n", "'__main__'", id='main-module'),
    pytest.param("import importlib\nm = importlib.import_module('pytest_diffbench.child')\n", "names the harness", id='harness-by-name'),
    pytest.param("import pytest\n", "imports pytest", id='import-pytest'),
    pytest.param("from pytest_diffbench import stages\n", "imports pytest_diffbench", id='import-harness'),
    pytest.param("def generate(pipe, batch):\n    pipe.unet._forward_pre_hooks.clear()\n", "removing module hooks", id='hooks-cleared'),
])
def test_the_static_screen_finds_tampering(code, finding):
    findings = screen_source(code)
    assert any(finding in f for f in findings), findings


def test_the_static_screen_leaves_acceleration_code_alone():
    code = textwrap.dedent('''
        """DeepCache on SD1.5. Not a FlopCounterMode trick: a comment may say anything."""
        import gc, sys, time
        import torch
        from diffusers import StableDiffusionPipeline, DPMSolverMultistepScheduler
        from DeepCache import DeepCacheSDHelper

        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.set_float32_matmul_precision("high")

        def load_pipeline(device, dtype):
            pipe = StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5", torch_dtype=dtype)
            pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
            pipe.unet.to(memory_format=torch.channels_last)
            helper = DeepCacheSDHelper(pipe=pipe)
            helper.set_params(cache_interval=3, cache_branch_id=0)
            helper.enable()
            gc.collect()
            return pipe.to(device)

        def generate(pipe, batch):
            start = time.perf_counter()
            gens = [torch.Generator("cpu").manual_seed(s) for s in batch["seeds"]]
            images = pipe(batch["prompts"], generator=gens).images
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            print(f"took {time.perf_counter() - start:.2f} s", file=sys.stderr)
            return images

        if __name__ == "__main__":
            print(generate(load_pipeline("cpu", torch.float32), {}))
    ''')
    assert screen_source(code) == []


def test_the_snapshot_finds_replaced_timers_and_counters(monkeypatch):
    import time as time_module

    import torch
    import torch.utils.flop_counter as flop_counter

    snapshot = harness_snapshot()
    assert snapshot.changes() == []
    op = next(iter(flop_counter.flop_registry))
    patches = [(time_module, "perf_counter", lambda: 0.0), (torch.cuda, "synchronize", lambda *a: None),
               (flop_counter.FlopCounterMode, "get_total_flops", lambda self: 1),
               (torch.nn.Module, "__call__", torch.nn.Module.__call__.__wrapped__
                if hasattr(torch.nn.Module.__call__, "__wrapped__") else lambda self, *a, **k: None)]
    for owner, name, value in patches:
        with monkeypatch.context() as m:
            m.setattr(owner, name, value)
            assert any(name in change for change in snapshot.changes()), (owner, name)
        assert snapshot.changes() == []  # put back: nothing to report
    with monkeypatch.context() as m:
        m.setitem(flop_counter.flop_registry, op, lambda *args, **kwargs: 0)
        assert any("flop_registry" in change for change in snapshot.changes())
    assert snapshot.changes() == []


def test_the_snapshot_finds_the_result_channel_swapped(monkeypatch):
    """Session 34: the attributes are sent on the result channel after the judged call; a channel
    (or its sender) swapped during the call for one that drops the harness's frames, after forged
    ones were sent on the real one, would make a forged copy the judged one. The child watches both
    (`Snapshot.watch_attribute`), and the guard reports the swap before the attributes are sent."""
    import io

    from pytest_diffbench import frames
    from pytest_diffbench.child import Channel

    read_fd, write_fd = os.pipe()
    try:
        channel = Channel.from_job({"result_fd": write_fd}, stdin=io.BytesIO(frames.token_line(b"t" * 16)))
        runner = types.SimpleNamespace(channel=channel)
        snapshot = harness_snapshot()
        snapshot.watch_attribute("the runner's result channel", runner, "channel")
        snapshot.watch_attribute("the result channel's sender", channel, "_send")
        assert snapshot.changes() == []
        with monkeypatch.context() as m:
            m.setattr(channel, "_send", lambda kind, payload: None)
            assert snapshot.changes() == ["the result channel's sender"]
        with monkeypatch.context() as m:
            m.setattr(runner, "channel", Channel(lambda kind, payload: None))
            assert snapshot.changes() == ["the runner's result channel"]
        assert snapshot.changes() == []
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_the_snapshot_finds_the_flop_counters_own_formula_tables_changed(monkeypatch):
    """The counter calls torch's formulas through copies with the formulas they call unwrapped
    (flops._shape_level_functions): its tables are watched as torch's registry is."""
    import torch

    from pytest_diffbench import flops

    counter = flops.LeanFlopCounterMode()
    snapshot = harness_snapshot(counter=counter)
    assert snapshot.changes() == []
    addmm = torch.ops.aten.addmm
    tables = [(counter._by_shape, addmm, "formulas by shape"),
              (flops._SHAPE_LEVEL, next(iter(flops._SHAPE_LEVEL)), "shape-level functions"),
              (flops._SHAPE_LEVEL_GLOBALS, "mm_flop", "names the FLOP counter's shape-level functions call")]
    for table, key, label in tables:
        with monkeypatch.context() as m:
            m.setitem(table, key, lambda *args, **kwargs: 0)
            assert any(label in change for change in snapshot.changes()), label
        assert snapshot.changes() == []


# ------------------------------------------------------------------------------------------------
# a real task: images precomputed for predicted seeds (tests/adversarial_tasks/)

TASK_ATTACKS = Path(__file__).resolve().parent / "adversarial_tasks"
PRECOMPUTE_TASK = "L4-dit-c2i-hard-0012"  # the cheapest family (DiT-256: 32 px on the tiny zoo)


def precompute_candidate(task, predicted: dict) -> str:
    """The task's reference code with tests/adversarial_tasks/precompute_public_seeds.py appended,
    its PREDICTED filled in with the public workload's {seed: class id}."""
    attack = (TASK_ATTACKS / "precompute_public_seeds.py").read_text()
    assert "PREDICTED: dict = {}" in attack
    attack = attack.replace("PREDICTED: dict = {}", f"PREDICTED: dict = {predicted!r}")
    return task.reference + "\n\n# ---- the attack (tests/adversarial_tasks/precompute_public_seeds.py) ----\n" + attack


@pytest.mark.slow
def test_images_precomputed_for_the_public_seeds_fail_under_secret_seeds(tiny_zoo, baseline_cache_dir, tmp_path):
    """The workload is public except its seeds: with `--diffbench-seeds=public` an attacker who read
    the repository precomputes the reference's images in load_pipeline and passes a hard L4 task
    with L ~ 0 from a 2-step pipeline (the weakness the public mode keeps, shown so that the attack
    is known to work); with the default secret seeds the same candidate fails on quality, as a
    model failure, not a harness error."""
    from pytest_diffbench.zoo.profiles import data_source, tiny_evaluator
    from pytest_diffbench.calibration import load_calibration
    from pytest_diffbench.evaluate import Candidate
    from pytest_diffbench.tasks import load_task
    from pytest_diffbench.workload import build_batch

    raw = load_task(REPO / "tasks" / "L4" / f"{PRECOMPUTE_TASK}.yaml")
    task = load_calibration(REPO / "tasks", "cpu-tiny").apply(raw)
    samples = 2
    public, _ = build_batch(task, "tiny", data_source(), tmp_path / "inputs", samples, seed_mode="public")
    assert public["seeds"] == [task.seed + i for i in range(samples)]
    code = precompute_candidate(task, dict(zip(public["seeds"], public["class_ids"])))
    expect = dict(re.findall(r"^expect (\w+): (\w+)$", (TASK_ATTACKS / "precompute_public_seeds.py").read_text(), re.M))
    results = {}
    for mode in ("public", "secret"):
        evaluator = tiny_evaluator(tiny_zoo, baseline_cache_dir, tmp_path / mode, samples=samples, timeout_s=300.0,
                                   # public: without the replay, whose throwaway seeds would hide even public
                                   # seeds from this attack (a smarter one carries their images: see test_replay)
                                   **({"seeds": mode, "replay": "off"} if mode == "public" else {"seeds": mode}))
        results[mode] = evaluator.evaluate(task, Candidate(code=code, source="test"), task.reference, task.gold)
        assert results[mode].provenance.seeds == mode and results[mode].provenance.seed_scope == "verdict"
    weak, strong = (results[m].verdict for m in ("public", "secret"))
    weak_m, strong_m = (results[m].measures for m in ("public", "secret"))
    summary = {m: (r.verdict.passed, r.verdict.category, r.measures.L, r.measures.U, r.verdict.message[:200])
               for m, r in results.items()}
    print(f"\nprecomputed images on {task.id} (hard target U >= {task.constraint.min_speedup}): {summary}")
    # public seeds: the attack works (L ~ 0 at the U of a 2-step sampler, above the hard target)
    assert weak.passed and expect["public"] == "passed", summary
    assert weak_m.L < 0.01 and weak_m.U >= task.constraint.min_speedup, summary
    # secret seeds (the default): the precomputed images are of other noise; the candidate is left
    # with its 2-step images and fails stage 3 on quality, a model failure
    assert not strong.passed and strong.category == expect["secret"] == stages.RELATIVE_QUALITY, summary
    assert strong.stage_reached == 3 and strong_m.L > strong_m.L_bound, summary
    assert strong.category in stages.MODEL_FAILURES
