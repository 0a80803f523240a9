"""Tests of fixtures/: benchmark data loaders, the tiny model zoo, resolve_models.

Loading through the private HF cache happens in child processes
(``pytest_diffbench.zoo.zoo.check_zoo``), so this process's environment and huggingface_hub
constants stay untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pytest_diffbench.zoo import data, zoo
from pytest_diffbench.zoo.plugin import HUB_CLIP_REPO, ModelSetup, ModelsUnavailableError, resolve_models

REPO_ROOT = Path(__file__).resolve().parent.parent

HF_ENV_KEYS = ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_HOME", "TRANSFORMERS_OFFLINE", "HF_HUB_VERBOSITY")


def _hashes(root: Path) -> dict[str, str]:
    out = {}
    for sub in ("hub", "open_clip"):
        for p in sorted((root / sub).rglob("*")):
            if p.is_file():
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="session")
def env_before():
    return {k: os.environ.get(k) for k in HF_ENV_KEYS}


@pytest.fixture(scope="session")
def tz(request, tmp_path_factory) -> zoo.ZooInfo:
    """The session's tiny zoo: the shared `tiny_zoo` fixture of tests/conftest.py when there is one (one build
    per session for all test modules), else ensure_tiny_zoo() into a session tmp dir."""
    try:
        return request.getfixturevalue("tiny_zoo")
    except pytest.FixtureLookupError:
        return zoo.ensure_tiny_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def check_rows(env_before, tz) -> list[dict]:
    return zoo.check_zoo(tz.root, size=64, steps=2, extra=True)


def _rows(rows, model_id, check=None):
    return [r for r in rows if r["model_id"] == model_id and (check is None or r["check"] == check)]


# ------------------------------------------------------------------------------------------------ data


def test_coco_captions():
    caps = data.coco_captions(10, 0)
    assert len(caps) == 10 and caps[0] == "A city at night with people walking around."
    assert data.coco_captions(2, 1) == caps[1:3]
    assert len(data.coco_captions(500, 0)) == 500
    with pytest.raises(ValueError):
        data.coco_captions(2, 499)


def test_imagenet_and_dit_labels():
    names = data.imagenet_class_names()
    assert len(names) == 1000 and names[:3] == ["tench", "goldfish", "great white shark"]
    id2label = data.dit_id2label()
    assert len(id2label) == 1000 and id2label[0] == "tench, Tinca tinca"
    assert id2label[2].startswith("great white shark, white shark")
    rows = data.imagenet_wordnet()
    assert rows[0]["wnid"] == "n01440764" and rows[134]["torchvision_name"] == "crane bird"


def test_init_images_and_sources():
    paths = data.init_image_paths()
    assert [p.name for p in paths] == ["astronaut.png", "chelsea.png", "coffee.png", "rocket.png"]
    sources = (data.DATA_DIR / "SOURCES.md").read_text(encoding="utf-8")
    for needle in ("CC BY 4.0", "CC BY-NC 4.0", "OpenRAIL", "public domain", "CC0", "BSD-3"):
        assert needle in sources
    for model_dir in zoo.CONFIG_DIR_NAMES.values():
        assert (data.CONFIGS_DIR / model_dir / "model_index.json").is_file()
    assert (data.CLIP_BPE_DIR / "vocab.json").is_file() and (data.CLIP_BPE_DIR / "merges.txt").is_file()


def test_imports_are_cheap():
    code = (
        "import sys; import pytest_diffbench.zoo.plugin, pytest_diffbench.zoo.data, pytest_diffbench.zoo.zoo; "
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'open_clip', 'huggingface_hub') "
        "if m in sys.modules]; print(heavy); assert not heavy, heavy"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------------ zoo build


def test_zoo_layout(tz):
    assert tz.kind == "tiny"
    assert set(tz.model_ids) == {m for ids in zoo.FAMILY_MODEL_IDS.values() for m in ids}
    assert set(zoo.FAMILY_MODEL_IDS) == {"sd15", "sd21", "sdxl", "dit", "pixart-alpha", "pixart-sigma"}
    env = tz.env()
    assert env["HF_HUB_CACHE"] == str(tz.hub_cache) and env["HF_HUB_OFFLINE"] == "1"
    assert env["TRANSFORMERS_OFFLINE"] == "1" and "HF_HOME" in env
    ready = json.loads((tz.root / zoo.READY_NAME).read_text())
    assert ready["zoo_version"] == zoo.ZOO_VERSION
    for model_id in tz.model_ids:
        repo = tz.hub_cache / zoo.repo_folder_name(model_id)
        rev = (repo / "refs" / "main").read_text()
        assert len(rev) == 40 and all(c in "0123456789abcdef" for c in rev)
        snap = repo / "snapshots" / rev
        assert (snap / "model_index.json").is_file()
        tree = json.loads((repo / "trees" / f"{rev}.json").read_text())
        files = sorted(str(p.relative_to(snap)) for p in snap.rglob("*") if p.is_file())
        assert sorted(tree["files"]) == files
    assert (tz.clip_dir / "open_clip_config.json").is_file()
    assert (tz.clip_dir / "open_clip_model.safetensors").is_file()


def test_zoo_structure_matches_real_repos(tz):
    for model_id in tz.model_ids:
        snap = zoo.snapshot_dir(tz.root, model_id)
        real_dir = data.CONFIGS_DIR / zoo.CONFIG_DIR_NAMES[model_id]
        real = json.loads((real_dir / "model_index.json").read_text())
        index = json.loads((snap / "model_index.json").read_text())
        assert index["_class_name"] == real["_class_name"]
        real_components = {k for k, v in real.items() if isinstance(v, list) and v[0] is not None}
        components = {k for k, v in index.items() if isinstance(v, list) and v[0] is not None}
        assert components == real_components, model_id
        # scheduler config: the real file, verbatim
        assert (snap / "scheduler" / "scheduler_config.json").read_bytes() == (
            real_dir / "scheduler" / "scheduler_config.json"
        ).read_bytes()
        for key in ("id2label", "requires_safety_checker", "force_zeros_for_empty_prompt"):
            if key in real:
                assert index[key] == real[key]
    sdxl = zoo.snapshot_dir(tz.root, "stabilityai/stable-diffusion-xl-base-1.0")
    assert json.loads((sdxl / "vae" / "config.json").read_text())["force_upcast"] is False
    sigma = zoo.snapshot_dir(tz.root, "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS")
    assert json.loads((sigma / "tokenizer" / "tokenizer_config.json").read_text())["model_max_length"] == 300
    alpha = zoo.snapshot_dir(tz.root, "PixArt-alpha/PixArt-XL-2-512x512")
    assert json.loads((alpha / "tokenizer" / "tokenizer_config.json").read_text())["model_max_length"] == 120


def test_build_is_byte_deterministic(tz, tmp_path):
    second = zoo.build_tiny_zoo(tmp_path / "zoo2")
    first_hashes, second_hashes = _hashes(tz.root), _hashes(second.root)
    assert first_hashes == second_hashes
    assert len(first_hashes) > 100


def test_tokenizers(tz):
    from transformers import CLIPTokenizer, T5Tokenizer

    sd = zoo.snapshot_dir(tz.root, "stable-diffusion-v1-5/stable-diffusion-v1-5")
    tok = CLIPTokenizer.from_pretrained(str(sd / "tokenizer"))
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    sd21 = zoo.snapshot_dir(tz.root, "stabilityai/stable-diffusion-2-1")
    assert CLIPTokenizer.from_pretrained(str(sd21 / "tokenizer")).pad_token == "!"

    assert zoo.t5_vocab() == zoo.t5_vocab()
    pa = zoo.snapshot_dir(tz.root, "PixArt-alpha/PixArt-XL-2-512x512")
    t5 = T5Tokenizer.from_pretrained(str(pa / "tokenizer"))
    caption = data.coco_captions(1, 0)[0]
    enc = t5(caption, padding="max_length", max_length=120, truncation=True)
    assert len(enc.input_ids) == 120 and enc.input_ids[0] not in (0, 1, 2)
    n = sum(enc.attention_mask)
    assert enc.input_ids[n - 1] == 1 and enc.input_ids[n:] == [0] * (120 - n)  # </s>, then <pad>
    assert t5.decode(enc.input_ids, skip_special_tokens=True) == caption
    assert t5.unk_token_id not in enc.input_ids


def test_ensure_builds_once_and_rebuilds_when_stale(tmp_path, monkeypatch):
    calls = []

    def fake_build(root):
        calls.append(root)
        (root / "hub").mkdir(parents=True, exist_ok=True)
        (root / "hub" / "file.bin").write_bytes(b"x" * 10)
        (root / "open_clip").mkdir(exist_ok=True)
        threading.Event().wait(0.2)  # widen the race window
        return zoo.zoo_info(root)

    monkeypatch.setattr(zoo, "build_tiny_zoo", fake_build)
    root = tmp_path / "z"
    threads = [threading.Thread(target=zoo.ensure_tiny_zoo, args=(root,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    info = zoo.ensure_tiny_zoo(root)
    assert len(calls) == 1 and info.hub_cache == root.resolve() / "hub"

    (root / "hub" / "file.bin").unlink()  # a listed file is missing -> rebuild
    zoo.ensure_tiny_zoo(root)
    assert len(calls) == 2

    marker = root / zoo.READY_NAME
    ready = json.loads(marker.read_text())
    ready["versions"] = dict(ready["versions"], transformers="0.0.1")
    marker.write_text(json.dumps(ready))  # built by other libraries (another venv): reused, not rebuilt
    zoo.ensure_tiny_zoo(root)
    assert len(calls) == 2

    ready["zoo_version"] = "old"
    marker.write_text(json.dumps(ready))  # another builder version -> rebuild
    zoo.ensure_tiny_zoo(root)
    assert len(calls) == 3
    assert json.loads(marker.read_text())["zoo_version"] == zoo.ZOO_VERSION


# ------------------------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("family", sorted(zoo.FAMILY_MODEL_IDS))
def test_family_loads_by_real_id_and_runs(check_rows, family):
    expected_scheduler = {
        "sd15": "PNDMScheduler",
        "sd21": "DDIMScheduler",
        "sdxl": "EulerDiscreteScheduler",
        "dit": "DDIMScheduler",
        "pixart-alpha": "DPMSolverMultistepScheduler",
        "pixart-sigma": "DPMSolverMultistepScheduler",
    }[family]
    for model_id in zoo.FAMILY_MODEL_IDS[family]:
        rows = _rows(check_rows, model_id)
        assert {r["check"] for r in rows} >= {"from_pretrained", "DiffusionPipeline"}
        for row in rows:
            assert row["ok"], row
            assert row["name_or_path"] == model_id
            assert row["scheduler"] == expected_scheduler
        main = _rows(check_rows, model_id, "from_pretrained")[0]
        assert main["pipeline_class"] == zoo.PIPELINE_CLASSES[family]
        assert _rows(check_rows, model_id, "DiffusionPipeline")[0]["pipeline_class"] == zoo.PIPELINE_CLASSES[family]
        if family == "sd21":
            assert main["prediction_type"] == "v_prediction"
        if family == "dit":
            assert main["label_ids"] == [0]  # get_label_ids(["tench"]) with no extra from_pretrained args
            assert main["image_size"] == ([32, 32] if model_id.endswith("256") else [64, 64])
        else:
            assert main["image_size"] == [64, 64]


def test_img2img_and_fp16_variants(check_rows):
    sdxl = "stabilityai/stable-diffusion-xl-base-1.0"
    row = _rows(check_rows, sdxl, "img2img")[0]
    assert row["ok"] and row["pipeline_class"] == "StableDiffusionXLImg2ImgPipeline", row
    assert row["name_or_path"] == sdxl
    sd15 = _rows(check_rows, "stable-diffusion-v1-5/stable-diffusion-v1-5", "img2img")[0]
    assert sd15["ok"] and sd15["pipeline_class"] == "StableDiffusionImg2ImgPipeline"
    for model_id in zoo.FAMILY_MODEL_IDS["sd15"] + zoo.FAMILY_MODEL_IDS["sd21"] + [sdxl]:
        assert _rows(check_rows, model_id, "fp16-variant")[0]["ok"]


def test_tiny_clip_scores(check_rows):
    row = [r for r in check_rows if r["check"] == "clip score"][0]
    assert row["ok"], row
    assert len(row["cosine"]) == 4 and all(-1.0 <= c <= 1.0 for c in row["cosine"])


def test_env_of_this_process_untouched(check_rows, env_before):
    assert {k: os.environ.get(k) for k in HF_ENV_KEYS} == env_before


# ------------------------------------------------------------------------------------------------ hub / resolve


def _fake_user_cache(tz, dest: Path, model_ids) -> Path:
    """A normal-looking HF cache holding (copies of) some repos: what real downloads would leave."""
    dest.mkdir(parents=True, exist_ok=True)
    for model_id in model_ids:
        shutil.copytree(tz.hub_cache / zoo.repo_folder_name(model_id), dest / zoo.repo_folder_name(model_id))
    return dest


def test_hub_models_available(tz, tmp_path):
    ids = ["stable-diffusion-v1-5/stable-diffusion-v1-5", "facebook/DiT-XL-2-256"]
    # the tiny zoo itself never counts as real weights
    assert zoo.hub_models_available(ids, cache_dir=tz.hub_cache) == {i: False for i in ids}
    assert zoo.hub_models_available(ids, cache_dir=tmp_path / "nope") == {i: False for i in ids}
    cache = _fake_user_cache(tz, tmp_path / "user", ids[:1])
    assert zoo.hub_models_available(ids, cache_dir=cache) == {ids[0]: True, ids[1]: False}
    # a snapshot without the unet weights is not usable
    snap = next((cache / zoo.repo_folder_name(ids[0]) / "snapshots").iterdir())
    for p in (snap / "unet").glob("*.safetensors"):
        p.unlink()
    assert zoo.hub_models_available(ids, cache_dir=cache)[ids[0]] is False


def test_resolve_models(tz, tmp_path):
    ids = ["stable-diffusion-v1-5/stable-diffusion-v1-5"]
    tiny = resolve_models("tiny", tz.root, ids)
    assert isinstance(tiny, ModelSetup) and tiny.zoo == "tiny"
    assert tiny.env == tz.env() and tiny.clip == f"local-dir:{tz.clip_dir}"
    assert "random-weight stand-ins" in tiny.detail
    unbuilt = tmp_path / "not-built"
    decided = resolve_models("tiny", unbuilt, ids, build=False)
    assert decided.zoo == "tiny" and "not built yet" in decided.detail and not unbuilt.exists()
    assert decided.env["HF_HUB_CACHE"] == str(unbuilt.resolve() / "hub")
    assert zoo.tiny_zoo_ready(tz.root) and not zoo.tiny_zoo_ready(unbuilt)

    empty = tmp_path / "empty-cache"
    empty.mkdir()
    with pytest.raises(ModelsUnavailableError) as err:
        resolve_models("hub", tz.root, ids + ["facebook/DiT-XL-2-256"], hub_cache=empty)
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in str(err.value)
    assert "facebook/DiT-XL-2-256" in str(err.value)
    assert err.value.missing == ids + ["facebook/DiT-XL-2-256"]

    auto = resolve_models("auto", tz.root, ids, hub_cache=empty)
    assert auto.zoo == "tiny" and "auto" in auto.detail

    cache = _fake_user_cache(tz, tmp_path / "user", ids)
    hub = resolve_models("auto", tz.root, ids, hub_cache=cache)
    assert hub.zoo == "hub" and hub.env["HF_HUB_CACHE"] == str(cache) and hub.clip is None
    assert resolve_models("hub", tz.root, ids, hub_cache=cache).zoo == "hub"
    assert HUB_CLIP_REPO.startswith("timm/")

    with pytest.raises(ValueError):
        resolve_models("random-weights", tz.root, ids)
