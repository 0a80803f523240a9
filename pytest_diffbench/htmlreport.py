"""`diffbench report RUN [RUN ...]`: one self-contained HTML file of one or more runs.

What it shows: the paper's table (one row per run, its model; S_p per level L1-L5, the average
over all tasks, S_a), failures per category and level, a U-against-L plot per level with the
bounds and targets, and per task the reference, gold and candidate images side by side with the
verdict, the stage's message, the figures, the candidate's code and, where a generator left one
(DiffAgent), its transcript.

Decisions (issue 15):

* jinja2 renders the template (`templates/report.html.j2`) with autoescape on: candidate code,
  tracebacks, stage messages and LLM transcripts are text, never markup. The page carries a
  Content-Security-Policy that allows no script and no fetch at all (images only as data: URIs),
  so that even a hole in the escaping runs nothing.
* Self-contained: plots are matplotlib SVGs and images are thumbnails, both as data: URIs; the
  file loads nothing.
* Bounded: per task and role at most `Limits.images` images, each re-encoded as a thumbnail of at
  most `Limits.image_px` pixels a side (files over `MAX_IMAGE_BYTES` or `MAX_IMAGE_PIXELS` are
  not decoded); code and transcripts cut to `Limits.code_chars` / `Limits.transcript_chars`, with
  the cut said in place. Images are read only from the task's own folders, never through a
  symbolic link, and only as PNGs.

Plain module: no pytest.
"""

from __future__ import annotations

import base64
import datetime
import io
import math
from dataclasses import dataclass
from pathlib import Path

from . import report
from .generation import is_generator_folder
from .result import TaskResult
from .runrecord import BASELINE_ROLES, CANDIDATE_IMAGES, Run
from .stages import CATEGORY_TITLES, HARNESS

#: what a thumbnail is made from: larger files or images are shown as "not shown", undecoded
MAX_IMAGE_BYTES = 16 << 20
MAX_IMAGE_PIXELS = 4096 * 4096
#: thumbnails smaller than this are drawn at a whole multiple of their size, at least this
DISPLAY_MIN_PX = 96
#: a generator's transcript in its folder of the task (DiffAgent's `agent/transcript.md`)
TRANSCRIPT_FILE = "transcript.md"
#: the rows of a task's image grid: role, title, folder in the task folder
IMAGE_ROWS = (("reference", "reference", BASELINE_ROLES[0]), ("gold", "gold", BASELINE_ROLES[1]),
              ("candidate", "candidate", CANDIDATE_IMAGES))
#: where a run's points go in the plots (matplotlib's tab10 colours, one per run)
RUN_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
               "#bcbd22", "#17becf")
#: and one marker per run, so that runs with the same figures stay visible over each other
RUN_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


@dataclass(frozen=True)
class Limits:
    """What one task may put into the page."""

    images: int = 4  # per role (reference, gold, candidate)
    image_px: int = 160  # thumbnail's longer side
    code_chars: int = 20_000
    transcript_chars: int = 60_000

    def __post_init__(self):
        for name in ("images", "image_px", "code_chars", "transcript_chars"):
            if getattr(self, name) < 0 or (name == "image_px" and self.image_px < 8):
                raise ValueError(f"report limit {name} is {getattr(self, name)}; it must be "
                                 f"{'at least 8' if name == 'image_px' else 'zero or more'}")


def write_report(runs: list[Run], out: Path, limits: Limits = Limits(), title: str | None = None) -> Path:
    """Render `runs` into the HTML file `out` (its folder is created); returns `out`."""
    from .atomic import write_atomic

    out = Path(out)
    write_atomic(out, render_report(runs, limits, title))
    return out


def render_report(runs: list[Run], limits: Limits = Limits(), title: str | None = None) -> str:
    """The report's HTML text."""
    import jinja2

    if not runs:
        raise ValueError("a report needs at least one run")
    env = jinja2.Environment(loader=jinja2.PackageLoader("pytest_diffbench", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    template = env.get_template("report.html.j2")
    levels = [lvl for lvl in report.LEVELS if any(lvl in run.levels for run in runs)]
    return template.render(
        title=title or "DiffBench report: " + ", ".join(run.name for run in runs),
        generated=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        levels=levels, runs=[_run_view(i, run) for i, run in enumerate(runs)],
        plots=[{"level": lvl, "src": _svg_data_uri(u_against_l_figure(runs, lvl)), **_plot_counts(runs, lvl)}
               for lvl in levels],
        tasks=_task_views(runs, limits), limits=limits)


# -- the table and the failures -------------------------------------------------------------

def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100.0 * value:.2f}"


def _run_view(index: int, run: Run) -> dict:
    scores = report.level_scores(run.results, run.levels)
    s_a = report.s_a_scores(run.results)
    profile = run.info.get("profile") or {}
    first = next((r.provenance for r in run.results if r.complete), None)
    failures = report.failures_by_level(run.results)
    return {
        "index": index, "name": run.name, "path": str(run.path), "model": run.model,
        "colour": RUN_COLOURS[index % len(RUN_COLOURS)],
        "profile": (first.profile if first else None) or "?",
        "zoo": (first.zoo if first else None) or profile.get("zoo") or "?",
        "device": (first.device if first else None) or profile.get("device_name") or "?",
        "quality": (first.quality_method if first else None) or "?",
        "speed": (first.speed_method if first else None) or "?",
        "started": run.info.get("started") or "", "finished": run.info.get("finished"),
        "suite": (run.info.get("suite") or {}).get("digest") or "",
        "scores": {lvl: {**score, "percent": _percent(score["S_p"])} for lvl, score in scores.items()},
        "average": _percent(scores["all"]["S_p"]), "evaluated": scores["all"]["tasks"] - scores["all"]["harness"],
        "S_a": _percent(s_a["all"][0]) if s_a else "–", "S_a_tasks": s_a["all"][1] if s_a else 0,
        "failures": [{"category": cat, "title": CATEGORY_TITLES.get(cat, cat),
                      "counts": [row.get(lvl, 0) for lvl in run.levels], "total": sum(row.values())}
                     for cat, row in failures.items()],
        "levels": run.levels, "cost": report.cost_totals(run.results), "tasks": len(run.results),
    }


# -- the plots ------------------------------------------------------------------------------

def required_speedup(result: TaskResult) -> float | None:
    """The U a task asks for: L4's target speedup, L5's latency target as a speedup over the
    reference latency it was set against; None elsewhere."""
    m = result.measures
    if m.target_speedup:
        return m.target_speedup
    if m.target_latency_ms and m.reference_latency_ms:
        return m.reference_latency_ms / m.target_latency_ms
    return None


def _finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _plot_counts(runs: list[Run], level: str) -> dict:
    mine = [r for run in runs for r in run.results if r.level == level]
    plotted = sum(_finite(r.measures.L, r.measures.U) for r in mine)
    return {"plotted": plotted, "unplotted": len(mine) - plotted}


def u_against_l_figure(runs: list[Run], level: str):
    """One level's tasks as points (x: quality loss L, y: speedup U), one colour and marker per run
    (later runs drawn smaller, on top), filled where the task passed; each task's L bound and
    required U (L4/L5) as ticks beside it, or as one line where all tasks share it; U = 1 (the
    reference's speed) as a grey line."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.6, 3.8), layout="constrained")
    ax = fig.add_subplot()
    plotted = [(index, [r for r in run.results if r.level == level and _finite(r.measures.L, r.measures.U)])
               for index, run in enumerate(runs)]
    everything = [r for _, points in plotted for r in points]
    methods = {r.provenance.quality_method or "?" for r in everything}
    bounds = {r.measures.L_bound for r in everything if _finite(r.measures.L_bound)}
    targets = {required_speedup(r) for r in everything if _finite(required_speedup(r))}
    for index, points in plotted:
        colour, marker, name = RUN_COLOURS[index % len(RUN_COLOURS)], RUN_MARKERS[index % len(RUN_MARKERS)], runs[index].name
        for passed in (True, False):
            chosen = [r for r in points if r.verdict.passed is passed]
            if chosen:
                ax.scatter([r.measures.L for r in chosen], [r.measures.U for r in chosen], s=64 - 12 * (index % 4),
                           zorder=3 + index, marker=marker, facecolors=colour if passed else "none", alpha=0.85,
                           edgecolors=colour, linewidths=1.4,
                           label=f"{name}: {'passed' if passed else 'failed'} ({len(chosen)})")
        # bounds and targets that differ from task to task: a tick level with each task's point
        ticks = [(r.measures.L_bound, r.measures.U) for r in points if _finite(r.measures.L_bound)]
        if len(bounds) > 1 and ticks:
            ax.scatter(*zip(*ticks), marker="|", s=120, color=colour, alpha=0.55, zorder=2)
        ticks = [(r.measures.L, required_speedup(r)) for r in points if _finite(required_speedup(r))]
        if len(targets) > 1 and ticks:
            ax.scatter(*zip(*ticks), marker="_", s=120, color=colour, alpha=0.55, zorder=2)
    ax.axhline(1.0, color="#999999", linewidth=0.8, zorder=1, label="U = 1 (reference speed)")
    if len(bounds) == 1:
        ax.axvline(next(iter(bounds)), color="#444444", linestyle="--", linewidth=1, zorder=1, label="L bound")
    elif bounds:
        ax.plot([], [], marker="|", linestyle="none", color="#444444", markersize=10, label="each task's L bound")
    if len(targets) == 1:
        ax.axhline(next(iter(targets)), color="#444444", linestyle=":", linewidth=1.2, zorder=1, label="required U")
    elif targets:
        ax.plot([], [], marker="_", linestyle="none", color="#444444", markersize=10, label="each task's required U")
    if not everything:
        ax.text(0.5, 0.5, "no task of this level has both L and U", transform=ax.transAxes, ha="center",
                va="center", color="#666666")
    if everything and min(r.measures.L for r in everything) >= 0:
        ax.set_xlim(left=-0.02 * ax.get_xlim()[1])  # from L = 0 (no loss), where the bound is measured from
    ax.set_title(f"{level}: speedup U against quality loss L")
    ax.set_xlabel(f"quality loss L ({', '.join(sorted(methods)) or 'fidelity or CLIP'})")
    ax.set_ylabel("speedup U")
    ax.grid(True, linewidth=0.4, alpha=0.5)
    ax.legend(fontsize=7, loc="best")
    return fig


def _svg_data_uri(fig) -> str:
    buffer = io.BytesIO()
    # no date, fixed ids: the same runs give the same bytes
    fig.savefig(buffer, format="svg", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# -- the tasks ------------------------------------------------------------------------------

def _task_views(runs: list[Run], limits: Limits) -> list[dict]:
    by_label: dict[str, list[tuple[int, Run, TaskResult]]] = {}
    for index, run in enumerate(runs):
        for result in run.results:
            by_label.setdefault(result.label, []).append((index, run, result))
    order = sorted(by_label, key=lambda label: (by_label[label][0][2].level, label))
    return [{"label": label, "level": by_label[label][0][2].level,
             "entries": [_entry(index, run, result, limits) for index, run, result in by_label[label]]}
            for label in order]


def _fmt(value, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _held_out(fidelity: dict | None) -> str | None:
    """Whether the verdict's held-out seeds passed (stages.HeldOut.record: no figures)."""
    held_out = (fidelity or {}).get("held_out")
    if not isinstance(held_out, dict) or "passed" not in held_out:
        return None
    return f"{'passed' if held_out['passed'] else 'failed'} ({held_out.get('samples')} samples)"


def _figures(result: TaskResult) -> list[tuple[str, str]]:
    m, p, s = result.measures, result.provenance, result.sandbox
    rows = [("L (quality loss)", m.L), ("L bound", m.L_bound), ("L vs gold", m.L_gold),
            ("L vs gold bound", m.L_gold_bound),
            ("held-out seeds", _held_out(m.fidelity)), ("U (speedup)", m.U), ("U of the gold", m.U_gold),
            ("required U", required_speedup(result)), ("latency ms/image", m.latency_ms),
            ("reference latency ms/image", m.reference_latency_ms), ("target latency ms", m.target_latency_ms),
            ("difficulty", m.difficulty), ("attainment", m.attainment),
            ("CLIP score", (m.clip or {}).get("mean")), ("PSNR dB", (m.fidelity or {}).get("mean_psnr_db")),
            ("quality / speed", f"{p.quality_method} / {p.speed_method}" if p.quality_method else None),
            ("samples", p.samples), ("seeds", p.seeds), ("sandbox", None if s is None else f"{s.status} ({s.isolation})"),
            ("candidate run s", None if s is None else s.wall_s), ("task s", result.task_s),
            ("candidate source", p.candidate_source), ("resumed", result.resumed or None)]
    rows += [(f"LLM {key}", value) for key, value in sorted(result.cost.items())]
    return [(name, _fmt(value)) for name, value in rows if value is not None]


def _entry(index: int, run: Run, result: TaskResult, limits: Limits) -> dict:
    v = result.verdict
    folder = run.task_dir(result)
    error = result.error or {}
    return {
        "run": run.name, "run_index": index, "colour": RUN_COLOURS[index % len(RUN_COLOURS)],
        "passed": v.passed, "verdict": "passed" if v.passed else CATEGORY_TITLES.get(v.category, v.category or "failed"),
        "category": v.category or "", "stage": v.stage_reached, "message": v.message,
        "harness": v.category == HARNESS, "figures": _figures(result),
        "error": (_clip_text(f"{error.get('type', '')} in {error.get('phase', '?')}: {error.get('message', '')}\n\n"
                             f"{error.get('traceback') or ''}".strip(), limits.code_chars) if error else None),
        "images": [{"role": role, "title": title, **_images(folder / sub if folder else None, limits)}
                   for role, title, sub in IMAGE_ROWS],
        "code": _read_text(folder / "candidate.py", limits.code_chars) if folder else None,
        "transcripts": _transcripts(folder, limits) if folder else [],
    }


def _clip_text(text: str, limit: int) -> str:
    """`text`, or its head and tail with the cut said in place when it is longer than `limit`."""
    if len(text) <= limit:
        return text
    head = limit * 2 // 3
    tail = limit - head
    return (text[:head] + f"\n\n[... {len(text) - limit} characters left out of this report ...]\n\n"
            + (text[-tail:] if tail else ""))


def _read_text(path: Path, limit: int) -> str | None:
    if not path.is_file() or path.is_symlink():
        return None
    with open(path, encoding="utf-8", errors="replace") as fh:
        text = fh.read(4 * limit + 1)  # never the whole of a huge file
    return _clip_text(text, limit)


def _transcripts(folder: Path, limits: Limits) -> list[dict]:
    """The transcripts generators left in their folders of the task (the harness knows no names)."""
    found = []
    for sub in sorted(folder.iterdir()):
        path = sub / TRANSCRIPT_FILE
        if not sub.is_symlink() and is_generator_folder(sub) and path.is_file():
            found.append({"name": f"{sub.name}/{TRANSCRIPT_FILE}", "text": _read_text(path, limits.transcript_chars)})
    return found


def _images(folder: Path | None, limits: Limits) -> dict:
    """Thumbnails of the first `limits.images` PNGs of `folder` (by name), as data: URIs."""
    if folder is None or not folder.is_dir() or folder.is_symlink():
        return {"thumbs": [], "more": 0, "note": "none kept"}
    files = sorted(p for p in folder.glob("*.png") if p.is_file() and not p.is_symlink())
    thumbs, problems = [], []
    for path in files[:limits.images]:
        try:
            thumb = thumbnail(path, limits.image_px)
        except ValueError as exc:
            problems.append(f"{path.name}: {exc}")
            continue
        # tiny-zoo images (32-64 px) are drawn larger, pixel for pixel
        scale = max(1, math.ceil(DISPLAY_MIN_PX / max(thumb["width"], thumb["height"])))
        thumbs.append({"name": path.name, **thumb, "shown_width": thumb["width"] * scale,
                       "shown_height": thumb["height"] * scale})
    return {"thumbs": thumbs, "more": max(0, len(files) - limits.images), "note": "; ".join(problems)}


def thumbnail(path: Path, max_px: int) -> dict:
    """{src, width, height} of a PNG shrunk to at most `max_px` a side: PNG while small (exact
    pixels), JPEG above 128 px (a photo's thumbnail in a tenth of the bytes). ValueError for
    what is not a decodable PNG within the size bounds."""
    from PIL import Image, UnidentifiedImageError

    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise ValueError(f"over {MAX_IMAGE_BYTES >> 20} MiB, not shown")
    try:
        with Image.open(path, formats=["PNG"]) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"{image.width}x{image.height} pixels, not shown")
            image = image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"not a readable PNG ({type(exc).__name__})") from None
    image.thumbnail((max_px, max_px))
    buffer = io.BytesIO()
    if max(image.size) > 128:
        image.save(buffer, format="JPEG", quality=85)
        mime = "image/jpeg"
    else:
        image.save(buffer, format="PNG", optimize=True)
        mime = "image/png"
    return {"src": f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}",
            "width": image.width, "height": image.height}
