"""Run records (run.json, results.jsonl, reference and gold images per task) and the `diffbench`
command (list, validate, report, compare, export), driven as a user drives them: real pytest
sessions in subprocesses on the tiny zoo, the command in a subprocess, the HTML report opened in a
real headless browser (Debian's chromium; skipped with the reason where it is absent)."""

import html.parser
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TASKS = REPO / "tasks"
ENV = {"HF_HUB_OFFLINE": "1", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}

#: three small tasks of two levels; the reference run passes them all
RUN_TASKS = ["L1-dit-c2i-0005", "L1-sd15-t2i-0001", "L2-sd15-t2i-deepcache-0006"]
#: the broken candidate's error text and code carry markup: the report must show it as text
MARKUP = "</pre><script>document.title='owned'</script><img src=x>"
BROKEN = f"""# {MARKUP}
def load_pipeline(device, dtype):
    raise RuntimeError("broken on purpose {MARKUP}")


def generate(pipe, batch):
    return []
"""


def _env(extra=None):
    env = {**os.environ, **ENV, **(extra or {})}
    env.pop("PYTEST_XDIST_WORKER", None)
    env.pop("PYTEST_XDIST_WORKER_COUNT", None)
    return env


def run_pytest(*args, env=None, timeout=900):
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=REPO,
                          env=_env(env), capture_output=True, text=True, timeout=timeout)


def diffbench(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "pytest_diffbench.cli", *map(str, args)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def write_candidates(folder: Path) -> None:
    """L1-sd15-t2i-0001: the gold with another scheduler (key attribute error); L1-dit-c2i-0005:
    a module that fails to load (runtime error); L2-sd15-t2i-deepcache-0006: none (no candidate)."""
    from pytest_diffbench.tasks import load_task

    folder.mkdir()
    gold = load_task(TASKS / "L1" / "L1-sd15-t2i-0001.yaml").gold
    (folder / "L1-sd15-t2i-0001.py").write_text(
        gold + "\n_load = load_pipeline\n"
               "def load_pipeline(device, dtype):\n"
               "    from diffusers import UniPCMultistepScheduler\n"
               "    pipe = _load(device, dtype)\n"
               "    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)\n"
               "    return pipe\n")
    (folder / "L1-dit-c2i-0005.py").write_text(BROKEN)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_zoo, baseline_cache_dir):
    """Three real runs of the same three tasks: `reference` (the gold solutions, serial),
    `broken` (a candidates folder with a wrong scheduler, a module that does not load and a
    missing file; under xdist, so the controller records the workers' results) and `agent`
    (DiffAgent's plain agent with the scripted oracle over HTTP, on the DiT task, the cheapest: a
    transcript)."""
    from pytest_diffbench.agent.scripted import Oracle, ScriptedModel, ScriptedServer

    root = tmp_path_factory.mktemp("report-runs")
    env = {"DIFFBENCH_ZOO_DIR": str(tiny_zoo.root), "DIFFBENCH_CACHE_DIR": str(baseline_cache_dir)}
    common = ["--diffbench-level=L1,L2", "-k", " or ".join(RUN_TASKS), "--diffbench-samples=2"]
    out = {}
    reference = run_pytest(*common, f"--diffbench-out={root / 'reference'}", env=env)
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]
    out["reference"] = reference.stdout
    write_candidates(root / "candidates")
    broken = run_pytest(*common, f"--diffbench-out={root / 'broken'}", f"--diffbench-candidates={root / 'candidates'}",
                        "-n", "2", env=env)
    assert broken.returncode == 1, broken.stdout[-3000:] + broken.stderr[-3000:]
    out["broken"] = broken.stdout
    with ScriptedServer(ScriptedModel(oracle=Oracle([TASKS]))) as server:
        agent = run_pytest("--diffbench-level=L1", "-k", "L1-dit-c2i-0005", "--diffbench-samples=2",
                           f"--diffbench-out={root / 'agent'}", "--agent=plain", "--llm=openai/oracle",
                           f"--llm-api-base={server.api_base}", "--llm-cache=off",
                           env={**env, "OPENAI_API_KEY": "not-used-by-the-local-server"})
    assert agent.returncode == 0, agent.stdout[-3000:] + agent.stderr[-3000:]
    out["agent"] = agent.stdout
    return root, out


# -- run records ------------------------------------------------------------------------------

@pytest.mark.slow
def test_run_json_records_the_session(runs):
    from pytest_diffbench.runrecord import suite_version

    root, stdout = runs
    info = json.loads((root / "broken" / "run.json").read_text())
    assert info["run_format"] == 1 and info["finished"] and info["started"] <= info["finished"]
    assert info["exitstatus"] == 1 and info["elapsed_s"] > 0 and info["task_s"] > 0
    assert info["options"]["diffbench_samples"] == 2
    assert info["options"]["diffbench_candidates"] == str(root / "candidates")
    assert info["generator"] == f"candidates:{(root / 'candidates').resolve()}" and info["model"] is None
    assert info["profile"]["zoo"] == "tiny" and info["profile"]["samples"] == 2
    assert {"torch", "diffusers", "pytest_diffbench", "python"} <= set(info["versions"])
    assert info["suite"]["digest"] == suite_version(TASKS)["digest"] and info["suite"]["yaml_files"] > 600
    assert info["levels"] == ["L1", "L2"] and info["results"] == 3
    # the same figures as the terminal summary
    assert info["scores"]["L1"] == {"tasks": 2, "passed": 0, "harness": 0, "S_p": 0.0}
    assert info["scores"]["all"]["tasks"] == 3
    assert re.search(r"(?m)^L1\s+2\s+0\s+0\s+0\.00%", stdout["broken"])
    assert info["failures"]["runtime"]["L1"] == 1 and info["failures"]["key_attribute"]["L1"] == 1
    assert info["failures"]["no_candidate"]["L2"] == 1 and info["failures"]["relative_speed"]["L2"] == 0
    assert info["cost"] == {"total_tokens": 0, "cost_usd": 0.0, "unpriced_tasks": 0}
    reference = json.loads((root / "reference" / "run.json").read_text())
    assert reference["scores"]["all"] == {"tasks": 3, "passed": 3, "harness": 0, "S_p": 1.0}
    agent = json.loads((root / "agent" / "run.json").read_text())
    assert agent["model"] == "openai/oracle" and agent["generator"] == "llm:openai/oracle:agent=plain"
    assert agent["cost"]["total_tokens"] > 0


@pytest.mark.slow
def test_results_jsonl_has_one_line_per_task_as_its_result_json(runs):
    """Written by the controller from the reports (under xdist too): one line per finished task,
    the very document of the task's result.json (less the file's tag)."""
    from pytest_diffbench import keys

    root, _ = runs
    for name, count in (("reference", 3), ("broken", 3), ("agent", 1)):
        lines = (root / name / "results.jsonl").read_text().splitlines()
        assert len(lines) == count, name
        for line in lines:
            doc = json.loads(line)
            written = json.loads((root / name / doc["label"] / "result.json").read_text())
            written.pop(keys.MAC_FIELD)
            assert doc == written, (name, doc["label"])


@pytest.mark.slow
def test_task_folders_hold_reference_and_gold_images_beside_the_candidates(runs):
    from PIL import Image

    root, _ = runs
    for name, label in (("reference", "L1-sd15-t2i-0001"), ("broken", "L1-sd15-t2i-0001"), ("agent", "L1-dit-c2i-0005"),
                        ("reference", "L2-sd15-t2i-deepcache-0006")):
        folder = root / name / label
        names = {role: sorted(p.name for p in (folder / role).glob("*.png")) for role in ("reference", "gold", "images")}
        assert names["reference"] == names["gold"] == names["images"] == ["000.png", "001.png"], (name, label, names)
        for role in ("reference", "gold"):
            with Image.open(folder / role / "000.png") as image:
                assert image.size == ((32, 32) if "-dit-" in label else (64, 64)), (name, label, role)
    # the candidate that never ran: its baselines are kept all the same, it has no images
    broken = root / "broken" / "L1-dit-c2i-0005"
    assert len(list((broken / "reference").glob("*.png"))) == 2 and not list((broken / "images").glob("*.png"))
    # no candidate: no baseline was measured for it
    assert not (root / "broken" / "L2-sd15-t2i-deepcache-0006" / "reference").exists()


@pytest.mark.slow
def test_a_generators_own_sessions_keep_no_baseline_images(tmp_path, tiny_zoo, baseline_cache_dir):
    """DiffAgent's GA rounds run sessions in the agent's seed scope, many candidates each: their
    task folders get no copies of the baselines (nobody reads them), but the run is recorded."""
    out = run_pytest("--diffbench-level=L1", "-k", "L1-dit-c2i-0005", "--diffbench-samples=2",
                     "--diffbench-seed-scope=agent", f"--diffbench-out={tmp_path / 'round'}",
                     env={"DIFFBENCH_ZOO_DIR": str(tiny_zoo.root), "DIFFBENCH_CACHE_DIR": str(baseline_cache_dir)})
    assert out.returncode == 0, out.stdout[-3000:]
    task = tmp_path / "round" / "L1-dit-c2i-0005"
    assert len(list((task / "images").glob("*.png"))) == 2
    assert not (task / "reference").exists() and not (task / "gold").exists()
    assert len((tmp_path / "round" / "results.jsonl").read_text().splitlines()) == 1


# -- compare and export -----------------------------------------------------------------------

@pytest.mark.slow
def test_compare_prints_both_runs_per_level_sp_and_the_changed_verdicts(runs):
    root, _ = runs
    out = diffbench("compare", root / "reference", root / "broken")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert re.search(r"^L1\s+2\s+100\.00%\s+2\s+0\.00%\s+-100\.00$", out.stdout, re.M), out.stdout
    assert re.search(r"^all\s+3\s+100\.00%\s+3\s+0\.00%\s+-100\.00$", out.stdout, re.M), out.stdout
    assert "verdicts changed: 3" in lines
    assert any(line.startswith("  L1-sd15-t2i-0001: passed -> key attribute error (stage 1): scheduler")
               for line in lines), out.stdout
    assert any(line.startswith("  L1-dit-c2i-0005: passed -> compilation/runtime error") for line in lines)
    assert "  L2-sd15-t2i-deepcache-0006: passed -> no candidate (stage 1): no candidate for" in out.stdout
    # a task run in one of them only
    out = diffbench("compare", root / "reference", root / "agent")
    assert "  L1-sd15-t2i-0001: passed -> not run" in out.stdout and "verdicts changed: 2" in out.stdout
    same = diffbench("compare", root / "reference", root / "reference")
    assert "verdicts changed: 0" in same.stdout


@pytest.mark.slow
def test_export_writes_what_diffbench_candidates_reads_back(runs, tmp_path, tiny_zoo, baseline_cache_dir):
    root, _ = runs
    exported = tmp_path / "exported"
    out = diffbench("export", root / "broken", exported)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in exported.iterdir()) == ["L1-dit-c2i-0005.py", "L1-sd15-t2i-0001.py"]
    assert (exported / "L1-dit-c2i-0005.py").read_text() == BROKEN
    assert "1 task(s) had no candidate code: L2-sd15-t2i-deepcache-0006" in out.stdout
    # read back by a session: the same verdict
    again = run_pytest("--diffbench-level=L1", "-k", "L1-dit-c2i-0005", "--diffbench-samples=2",
                       f"--diffbench-candidates={exported}", f"--diffbench-out={tmp_path / 'again'}",
                       env={"DIFFBENCH_ZOO_DIR": str(tiny_zoo.root), "DIFFBENCH_CACHE_DIR": str(baseline_cache_dir)})
    assert "compilation/runtime error 1" in again.stdout, again.stdout[-3000:]
    record = json.loads((tmp_path / "again" / "results.jsonl").read_text())
    assert record["category"] == "runtime" and "broken on purpose" in record["message"]
    # a second export into the same folder is refused, naming it
    out = diffbench("export", root / "broken", exported)
    assert out.returncode == 2 and f"{exported}: exists and is not an empty folder" in out.stderr


# -- the report in a browser ------------------------------------------------------------------

def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no chromium on PATH: install Debian's with `apt-get install -y chromium` (.ci/run does)")


def browse(page: Path, tmp_path: Path, *what: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.glob('chromium-profile-*')))}"
    return subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={profile}", "--hide-scrollbars", *what, page.as_uri()],
                          capture_output=True, text=True, timeout=180)


class Dom(html.parser.HTMLParser):
    """The elements of a dumped DOM: (tag, attributes, text inside), and the open-tag path of each."""

    VOID = {"img", "meta", "br", "hr", "input", "link", "col", "source", "wbr"}

    def __init__(self, text: str):
        super().__init__()
        self.elements: list[dict] = []
        self._open: list[dict] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        element = {"tag": tag, "attrs": dict(attrs), "text": "", "parents": list(self._open)}
        self.elements.append(element)
        if tag not in self.VOID:
            self._open.append(element)

    def handle_endtag(self, tag):
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i]["tag"] == tag:
                del self._open[i:]
                break

    def handle_data(self, data):
        for element in self._open:
            element["text"] += data

    def within(self, ancestor: dict, tag: str, **attrs) -> list[dict]:
        """The elements `find` finds inside `ancestor`."""
        return [e for e in self.find(tag, **attrs) if any(p is ancestor for p in e["parents"])]

    def find(self, tag, **attrs):
        wanted = {k.rstrip("_").replace("_", "-"): v for k, v in attrs.items()}
        return [e for e in self.elements if e["tag"] == tag
                and all(e["attrs"].get(k) == v or (k == "class" and v in (e["attrs"].get("class") or "").split())
                        for k, v in wanted.items())]


#: appended to a copy of the report: writes each image's decoded size into the page
PROBE = """<script>
window.addEventListener("load", () => {
  const sizes = Array.from(document.images, img => [img.className || img.alt, img.naturalWidth, img.naturalHeight]);
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify(sizes);
  document.body.appendChild(out);
});
</script>"""


@pytest.mark.slow
def test_the_report_renders_in_a_real_browser(runs, tmp_path):
    from PIL import Image

    chromium()  # skips here, before the report is written, where there is none
    root, _ = runs
    page = tmp_path / "report.html"
    out = diffbench("report", root / "reference", root / "broken", root / "agent", "-o", page)
    assert out.returncode == 0, out.stderr
    assert "3 run(s), 7 task results" in out.stdout

    # the virtual time budget: the page's load event (and the probe below) before the dump
    dumped = browse(page, tmp_path, "--dump-dom", "--virtual-time-budget=10000")
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    dom = Dom(dumped.stdout)
    # the paper's table: one row per run, S_p per level as run.json says, the average, S_a
    rows = {row["attrs"]["data-run"]: row for row in dom.find("tr", class_="score-row")}
    assert list(rows) == ["reference", "broken", "agent"]
    cells = {(name, cell["attrs"]["data-level"]): cell["text"].strip()
             for name, row in rows.items() for cell in dom.within(row, "td") if "data-level" in cell["attrs"]}
    for name in rows:
        scores = json.loads((root / name / "run.json").read_text())["scores"]
        for level, score in scores.items():
            column = "average" if level == "all" else level
            assert cells[(name, column)] == f"{100.0 * score['S_p']:.2f}", (name, level)
    assert cells[("broken", "L1")] == "0.00" and cells[("reference", "average")] == "100.00"
    assert cells[("agent", "L2")] == "–"  # the agent run had no L2 task
    assert "openai/oracle" in rows["agent"]["text"] and "candidates:" in rows["broken"]["text"]
    # failures per category and level
    broken = dom.find("table", class_="failures-table", data_run="broken")[0]
    failures = {row["attrs"]["data-category"]: [c["text"] for c in dom.within(row, "td")][1:]
                for row in dom.within(broken, "tr") if "data-category" in row["attrs"]}
    assert failures["runtime"] == ["1", "0", "1"] and failures["key_attribute"] == ["1", "0", "1"]
    assert failures["no_candidate"] == ["0", "1", "1"] and failures["relative_speed"] == ["0", "0", "0"]
    # one plot per level
    assert [f["attrs"]["data-level"] for f in dom.find("figure")] == ["L1", "L2"]
    # per task: verdict, message, images of the three roles, code; the markup stays text
    section = dom.find("section", data_label="L1-dit-c2i-0005")[0]
    entry = dom.within(section, "div", class_="entry", data_run="broken")[0]
    assert "compilation/runtime error" in entry["text"] and "broken on purpose " + MARKUP in entry["text"]
    assert dom.within(entry, "pre", class_="code")[0]["text"] == BROKEN
    assert not dom.find("script") and "owned" not in dom.find("title")[0]["text"]
    transcript = dom.find("pre", class_="transcript")
    assert len(transcript) == 1 and "## 1. LLM" in transcript[0]["text"]
    section = dom.find("section", data_label="L1-sd15-t2i-0001")[0]
    for entry in dom.within(section, "div", class_="entry"):
        thumbs = {t["attrs"]["data-role"]: len(dom.within(t, "img")) for t in dom.within(entry, "div", class_="thumbs")}
        assert thumbs == {"reference": 2, "gold": 2, "candidate": 2}, (entry["attrs"]["data-run"], thumbs)

    # every image decodes: a copy with a probe script writes their sizes into the page (the
    # report's own policy allows no script, so the copy leaves the policy out)
    policy = re.search(r'<meta http-equiv="Content-Security-Policy"[^>]*>', page.read_text())
    assert policy and "default-src 'none'" in policy.group(0)
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text().replace(policy.group(0), "").replace("</body>", PROBE + "</body>"))
    probe = Dom(browse(probed, tmp_path, "--dump-dom", "--virtual-time-budget=10000").stdout).find("pre", id="probe")
    sizes = json.loads(probe[0]["text"])
    images = dom.find("img")
    assert len(sizes) == len(images) > 20
    assert all(width > 0 and height > 0 for _, width, height in sizes), sizes
    assert sum(1 for name, _, _ in sizes if name == "plot") == 2
    # with the policy in place the same probe does not run
    blocked = tmp_path / "blocked.html"
    blocked.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    assert not Dom(browse(blocked, tmp_path, "--dump-dom", "--virtual-time-budget=10000").stdout).find("pre", id="probe")

    # what renders is not a blank page: text, table lines, plots and images in many colours
    shot = tmp_path / "report.png"
    taken = browse(page, tmp_path, "--window-size=1280,2400", f"--screenshot={shot}")
    assert taken.returncode == 0 and shot.is_file(), taken.stderr[-2000:]
    with Image.open(shot) as image:
        rgb = image.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 20)
        not_white = sum(n for n, c in colours if sum(c) < 3 * 235)
        assert len(colours) > 500 and not_white > 0.05 * rgb.width * rgb.height, (len(colours), not_white)
    if os.environ.get("DIFFBENCH_REPORT_SHOT"):  # keep the screenshot (docs/report-example.png)
        shutil.copy(shot, os.environ["DIFFBENCH_REPORT_SHOT"])


# -- bad input ----------------------------------------------------------------------------------

def _result_doc(label="L1-sd15-t2i-0001", **changes):
    from pytest_diffbench.result import TaskResult
    from pytest_diffbench.stages import Verdict

    doc = TaskResult(task_id=label.split("@")[0], label=label, level="L1", verdict=Verdict(True, 3, None, "passed"),
                     complete=True).to_json()
    doc.update(changes)
    return doc


def test_unreadable_runs_are_errors_naming_file_and_line(tmp_path):
    missing = diffbench("report", tmp_path / "nowhere")
    assert missing.returncode == 2 and f"{tmp_path / 'nowhere'}: not a run directory (no such folder)" in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = diffbench("compare", tmp_path / "empty", tmp_path / "empty")
    assert empty.returncode == 2 and "not a run directory (no run.json, results.jsonl or <task>/result.json)" in empty.stderr
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.jsonl").write_text(json.dumps(_result_doc()) + "\n" + json.dumps(_result_doc(L="far")) + "\n")
    bad = diffbench("report", run, "-o", tmp_path / "r.html")
    assert bad.returncode == 2 and f"{run / 'results.jsonl'}:2: result document: 'L' is str 'far'" in bad.stderr
    (run / "results.jsonl").write_text("{not json\n")
    assert f"{run / 'results.jsonl'}:1:" in diffbench("export", run, tmp_path / "x").stderr
    (run / "results.jsonl").write_text(json.dumps(_result_doc()) + "\n")
    (run / "run.json").write_text("[1, 2]")
    assert f"{run / 'run.json'}: expected a JSON object, found list" in diffbench("compare", run, run).stderr
    limits = diffbench("report", tmp_path / "nowhere", "--image-px", "2")
    assert limits.returncode == 2 and "image_px is 2; it must be at least 8" in limits.stderr


def test_the_report_bounds_what_it_embeds_and_reads_only_the_tasks_own_folders(tmp_path):
    """At most N thumbnails per role, long code cut with the cut said, a file that is no PNG not
    decoded, and a label that points out of the run directory reads nothing."""
    from PIL import Image

    from pytest_diffbench.htmlreport import Limits, render_report
    from pytest_diffbench.runrecord import load_run

    run = tmp_path / "run"
    task = run / "L1-sd15-t2i-0001"
    for role in ("reference", "gold", "images"):
        (task / role).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (64, 48), (40 * i, 90, 200)).save(task / role / f"{i:03d}.png")
    (task / "images" / "005.png").write_bytes(b"GIF89a not a png")
    (task / "candidate.py").write_text("x = 1\n" * 5000)
    (tmp_path / "candidate.py").write_text("do not show")  # where the label ".." points
    (run / "results.jsonl").write_text(json.dumps(_result_doc()) + "\n"
                                       + json.dumps(_result_doc(label="..", task_id="..")) + "\n")
    text = render_report([load_run(run)], Limits(images=3, image_px=32, code_chars=1000))
    dom = Dom(text)
    section = dom.find("section", data_label="L1-sd15-t2i-0001")[0]
    per_role = {t["attrs"]["data-role"]: dom.within(t, "img") for t in dom.within(section, "div", class_="thumbs")}
    assert {role: len(imgs) for role, imgs in per_role.items()} == {"reference": 3, "gold": 3, "candidate": 3}
    # 64x48 shrunk to 32x24, drawn at 3x (a whole multiple, the longer side at least 96 px)
    assert {(i["attrs"]["width"], i["attrs"]["height"]) for i in per_role["gold"]} == {("96", "72")}
    assert "+2 more" in text and "+3 more" in text  # 5 kept baselines, 6 candidate files
    code = dom.find("pre", class_="code")[0]["text"]
    assert len(code) < 1200 and "characters left out of this report" in code
    assert "do not show" not in text
    few = render_report([load_run(run)], Limits(images=10))
    assert "005.png: not a readable PNG" in few


def test_list_and_validate(tmp_path):
    listed = diffbench("list", "--level", "L2", "--json")
    assert listed.returncode == 0
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert len(rows) == len(list((TASKS / "L2").glob("*.yaml"))) and {r["level"] for r in rows} == {"L2"}
    assert diffbench("list", "--level", "L9").returncode == 2
    valid = diffbench("validate")
    assert valid.returncode == 0 and re.search(r"^\d+ tasks in .* are valid \(L1 \d+, L2 \d+", valid.stdout)
    tasks = tmp_path / "tasks"
    (tasks / "L1").mkdir(parents=True)
    text = (TASKS / "L1" / "L1-sd15-t2i-0001.yaml").read_text().replace("steps: 50", "steps: many", 1)
    (tasks / "L1" / "L1-sd15-t2i-0001.yaml").write_text(text)
    invalid = diffbench("validate", "--tasks", tasks)
    assert invalid.returncode == 1
    assert "L1-sd15-t2i-0001.yaml" in invalid.stderr and "steps" in invalid.stderr


def test_the_console_script_and_the_reports_dependencies_are_declared():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["diffbench"] == "pytest_diffbench.cli:main"
    names = {re.split(r"[<>=;\[ ]", dep, maxsplit=1)[0].lower() for dep in project["dependencies"]}
    assert {"jinja2", "matplotlib"} <= names
    from pytest_diffbench import cli

    assert cli.main(["validate"]) == 0
