"""Model cards: ``README.md`` in the Hugging Face model-card format, for a run folder and for each of its bundles.

A card is a YAML metadata header between ``---`` lines (``license``, ``library_name``, ``pipeline_tag``, ``tags``,
``datasets``, ``metrics`` and a ``model-index`` holding the student's test-split figures), then sections: the
teacher, the data, the losses, the accuracy of the student beside the teacher and the baseline, latency per backend
with the host it was measured on, parity of each bundle with PyTorch, and the licences of the teacher and generator
weights. Every figure is read from a file of the run: ``metrics.json`` (else the evaluate stage's own copy,
``stages/evaluate-metrics.json``), ``recipe.yaml``, ``split.json``, ``bench.json``, each bundle's ``manifest.json``
and the licences recorded in ``student/model.pt``. A section whose file is absent says so; nothing is estimated.

``gather_run`` / ``gather_bundle`` read the files into a ``CardSources``; ``render_card`` and the section
functions are pure (data in, text out); ``write_bundle_card`` / ``write_run_cards`` write the cards atomically.
"""
import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .report import markdown_table
from .utils import atomic_write_text, read_json

log = logging.getLogger(__name__)
MODELS = ("teacher", "student", "baseline")
LOSS_TERMS = {"ce": "cross-entropy on the real labels (task term)",
              "kd": "Hinton KD: T² · KL(teacher ‖ student) at temperature T",
              "hard_kd": "cross-entropy against the teacher's top-1",
              "feature_l2": "L2 between normalised student and teacher embeddings",
              "align_uniform": "alignment + uniformity on projected embeddings"}
LOSS_SETTINGS = ("temperature", "label_smoothing", "proj_dim")  # loss keys that are not term weights
# Licence texts (as teachers and generators record them) -> Hugging Face licence identifiers.
HF_LICENCES = (("apache-2.0", "apache-2.0"), ("apache 2.0", "apache-2.0"), ("mit", "mit"),
               ("creativeml openrail++-m", "openrail++"), ("creativeml openrail-m", "creativeml-openrail-m"))


@dataclass
class CardSources:
    """What a card is built from; each field is None or empty when its file does not exist."""

    kind: str                        # "run" or "bundle"
    name: str                        # the run's recipe name, or the bundle's <format>-<precision>
    recipe: dict = field(default_factory=dict)   # recipe.yaml as plain data
    metrics: dict | None = None
    metrics_file: str | None = None  # which file the metrics came from, relative to the run folder
    split: dict | None = None        # split.json's image counts
    bench: list = field(default_factory=list)    # bench.json rows (a bundle's card: its own and PyTorch's)
    manifests: dict = field(default_factory=dict)  # bundle name -> manifest.json
    licences: dict | None = None     # {"teacher", "generator", "student_init"} as export/bundle.py records them


# ---------------------------------------------------------------------------------------------------------------
# Reading the files


def read_yaml(path: Path) -> dict:
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def find_metrics(run_dir: Path) -> tuple[dict | None, str | None]:
    """``metrics.json``, else the evaluate stage's copy (a seed folder, or a run whose summary is not written yet)."""
    for name in ("metrics.json", "stages/evaluate-metrics.json"):
        if (run_dir / name).is_file():
            return read_json(run_dir / name), name
    return None, None


def exported_dir(run_dir: Path) -> Path:
    """The folder holding the exported student and its bundles: the run itself, or (``--seeds N``) its first seed."""
    if (run_dir / "student" / "model.pt").is_file() or (run_dir / "export").is_dir():
        return run_dir
    seed = run_dir / "seed-0"
    return seed if seed.is_dir() else run_dir


def split_counts(run_dir: Path) -> dict | None:
    path = run_dir / "split.json"
    if not path.is_file():
        return None
    split = read_json(path)
    return {"classes": list(split.get("classes", [])), **{k: len(split.get(k) or []) for k in
            ("train", "val", "test", "labelled", "unlabelled", "skipped")}, "has_labelled": "labelled" in split}


def bundle_folders(folder: Path) -> list[Path]:
    """``folder/export/<format>-<precision>/``; not an export's unfinished ``.<name>.try<i>`` attempts."""
    return [p.parent for p in sorted((folder / "export").glob("*/manifest.json")) if not p.parent.name.startswith(".")]


def bundle_manifests(folder: Path) -> dict:
    return {b.name: read_json(b / "manifest.json") for b in bundle_folders(folder)}


def saved_licences(student_dir: Path) -> dict | None:
    """The licences ``student/model.pt`` carries (what export writes into every manifest), or None."""
    path = student_dir / "student" / "model.pt"
    if not path.is_file():
        return None
    import torch

    from .export.bundle import licences

    return licences(torch.load(path, map_location="cpu", weights_only=True, mmap=True))


def gather_run(run_dir) -> CardSources:
    """A run folder's card sources: its metrics, recipe and split, and the exported student's bundles and bench."""
    run_dir = Path(run_dir)
    exported = exported_dir(run_dir)
    metrics, metrics_file = find_metrics(run_dir)
    recipe = read_yaml(run_dir / "recipe.yaml")
    manifests = bundle_manifests(exported)
    licences = next(iter(manifests.values()))["licences"] if manifests else saved_licences(exported)
    bench = read_json(exported / "bench.json") if (exported / "bench.json").is_file() else []
    return CardSources("run", recipe.get("name") or run_dir.name, recipe, metrics, metrics_file,
                       split_counts(run_dir), bench, manifests, licences)


def gather_bundle(bundle_dir) -> CardSources:
    """A bundle's card sources: its manifest, and, when it lies in ``RUN/export/``, its run's files."""
    bundle_dir = Path(bundle_dir)
    manifest = read_json(bundle_dir / "manifest.json")
    run_dir = bundle_dir.parent.parent if bundle_dir.parent.name == "export" else None
    metrics, metrics_file, recipe, split = None, None, {}, None
    if run_dir is not None:
        metrics, metrics_file = find_metrics(run_dir)
        recipe, split = read_yaml(run_dir / "recipe.yaml"), split_counts(run_dir)
    bench_file = next((f for f in (bundle_dir / "bench.json", run_dir and run_dir / "bench.json") if f and
                       f.is_file()), None)
    rows = read_json(bench_file) if bench_file else []
    rows = [r for r in rows if r.get("bundle") is None and r.get("backend") in ("pytorch", "torch-compile")
            or r.get("bundle") and Path(r["bundle"]).name == bundle_dir.name]
    if not any(r.get("bundle") for r in rows):
        rows = []  # PyTorch alone says nothing about this bundle
    return CardSources("bundle", bundle_dir.name, recipe, metrics, metrics_file, split, rows,
                       {bundle_dir.name: manifest}, manifest.get("licences"))


# ---------------------------------------------------------------------------------------------------------------
# Rendering (pure)


def pct(v, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def hf_licence(texts: list) -> tuple[str, str | None]:
    """The card's ``license`` (and ``license_name`` when it is ``other``) from the weights' licence texts.

    Random weights carry no licence. One Hub identifier shared by every licensed weight is the card's; none at all is
    ``unknown``; several, or one the Hub has no identifier for, is ``other``, and the Licences section lists them.
    """
    ids = set()
    for text in texts:
        low = (text or "unknown").lower()
        if low.startswith("none"):
            continue
        ids.add(next((hf for prefix, hf in HF_LICENCES if low.startswith(prefix)), None))
    if not ids:
        return "unknown", None
    if len(ids) == 1 and None not in ids:
        return ids.pop(), None
    return "other", "teacher-and-generator-licences"


def licence_texts(src: CardSources) -> list:
    lic = src.licences or {}
    return [(lic.get(k) or {}).get("licence") for k in ("teacher", "generator") if lic.get(k)]


def student_name(src: CardSources) -> str:
    student = src.recipe.get("student") or next(iter(src.manifests.values()), {}).get("source", {}).get("student", {})
    return (student or {}).get("name", "unknown student")


def dataset_name(src: CardSources) -> str | None:
    data = src.recipe.get("data") or {}
    if not data:
        return None
    name = data.get("dataset", "imagefolder")
    return f"imagefolder:{Path(data['root']).name}" if name == "imagefolder" and data.get("root") else name


def model_index(src: CardSources) -> list | None:
    """The student's test-split figures (percent) in the Hub's ``model-index`` form; None without metrics."""
    student = (src.metrics or {}).get("student")
    if not student or student.get("top1") is None:
        return None
    found = [("accuracy", "top1", "Top-1 accuracy (%)"), ("balanced_accuracy", "balanced_accuracy",
             "Balanced accuracy (%)"), ("f1", "macro_f1", "Macro-F1 (%)")]
    seeds = f", mean of {src.metrics['n_seeds']} seeds" if src.metrics.get("n_seeds") else ""
    metrics = [{"type": t, "value": float(student[k]), "name": f"{n[:-1]}{seeds})"} for t, k, n in found
               if student.get(k) is not None]
    for name, manifest in src.manifests.items() if src.kind == "bundle" else ():
        a = manifest.get("accuracy") or {}
        if a.get("top1") is not None:
            metrics.append({"type": "accuracy", "value": 100.0 * a["top1"], "name": f"Top-1 accuracy of the {name} "
                            f"bundle (%; split {a.get('split')}, {a.get('images')} images)"})
    dataset = {"type": dataset_name(src) or "unknown", "name": dataset_name(src) or "unknown", "split": "test"}
    return [{"name": f"{src.recipe.get('name', src.name)}-{student_name(src)}",
             "results": [{"task": {"type": "image-classification", "name": "Image Classification"},
                          "dataset": dataset, "metrics": metrics}]}]


def metadata(src: CardSources) -> dict:
    """The YAML header: Hub metadata fields only."""
    licence, licence_name = hf_licence(licence_texts(src))
    meta = {"license": licence}
    if licence_name:
        meta["license_name"] = licence_name
    kinds = {(m.get("output") or {}).get("kind") for m in src.manifests.values()}
    meta["library_name"] = "edgedistill"  # the files load with edgedistill / export/run.py, not with timm
    meta["pipeline_tag"] = "image-feature-extraction" if kinds == {"embedding"} else "image-classification"
    tags = ["edgedistill", "knowledge-distillation", "image-classification", "timm", student_name(src)]
    for m in src.manifests.values():
        tags += [m["format"], m["precision"]]
    meta["tags"] = list(dict.fromkeys(tags))
    if dataset_name(src):
        meta["datasets"] = [dataset_name(src)]
    index = model_index(src)
    if index:
        meta["metrics"] = ["accuracy", "f1"]
        meta["model-index"] = index
    return meta


def title_section(src: CardSources) -> list[str]:
    recipe = src.recipe.get("name", "an edgedistill run")
    teacher = (src.recipe.get("teacher") or {}).get("name", "its teacher")
    if src.kind == "bundle":
        m = src.manifests[src.name]
        lines = [f"# {recipe}: {student_name(src)} ({m['format']} {m['precision']})", "",
                 f"The `{m['format']}` {m['precision']} bundle of the student `{student_name(src)}`, distilled from "
                 f"`{teacher}` with edgedistill. It runs with `{m['runtime']['name']}` and `export/run.py` "
                 "(numpy + pillow + the runtime, no torch):", "", "```bash",
                 f"python export/run.py predict {src.name} image.jpg", "```"]
    else:
        lines = [f"# {recipe}: {student_name(src)} distilled from {teacher}", "",
                 "An edgedistill run: the trained student (`student/model.pt`, loaded with "
                 "`edgedistill.students.load_student`), its metrics and, when exported, its bundles (`export/`)."]
        if (src.metrics or {}).get("n_seeds"):
            lines += ["", f"Trained with {src.metrics['n_seeds']} seeds: accuracy is the mean over seeds; the student, "
                      "its bundles, latency and parity are the first seed's (`seed-0/`), which export and bench use."]
    description = src.recipe.get("description")
    return lines + (["", description] if description else [])


def teacher_section(src: CardSources) -> list[str]:
    t = src.recipe.get("teacher") or {}
    info = ((src.licences or {}).get("teacher")) or ((src.metrics or {}).get("teacher")) or {}
    if not t and not info:
        return ["## Teacher", "", "Not recorded: no recipe.yaml or licence record beside this card."]
    name, arch = info.get("name") or t.get("name"), info.get("arch") or t.get("arch") or "-"
    lines = ["## Teacher", "", f"- model: `{name}` (arch `{arch}`)",
             f"- weights: {info.get('weights', 'not recorded')}"]
    head = t.get("head", "linear")
    if t:
        lines.append("- used as: " + {"zeroshot": "zero-shot, through text embeddings of the class names",
                                      "native": "its own classifier"}.get(head, f"{t.get('mode', 'probe')} with a "
                                                                                 f"{head} head"))
    return lines


def data_section(src: CardSources) -> list[str]:
    lines = ["## Data", ""]
    data = src.recipe.get("data") or {}
    if data:
        root = f" (`{data['root']}`)" if data.get("root") else ""
        lines.append(f"- dataset: `{data.get('dataset', 'imagefolder')}`{root}")
    s = src.split
    if s:
        lines.append(f"- {len(s['classes'])} classes: {', '.join(s['classes'][:20])}"
                     + (", …" if len(s["classes"]) > 20 else ""))
        lines.append(f"- split.json: {s['train']} train, {s['val']} validation, {s['test']} test images"
                     + (f"; {s['skipped']} unreadable image(s) skipped" if s["skipped"] else "")
                     + (f"; {s['unlabelled']} more unlabelled images" if s["unlabelled"] else ""))
    synth = src.recipe.get("synthetic")
    if synth:
        lines.append(f"- synthetic images: generator `{synth.get('generator')}`")
    rows = [(n, *(m["images"].get(k, "–") for k in ("labelled", "unlabelled", "synthetic")))
            for n in MODELS if (m := (src.metrics or {}).get(n)) and m.get("images")]
    if rows:
        lines += ["", f"Images each model learnt from ({src.metrics_file}):", ""]
        lines += markdown_table([("model", "labelled", "unlabelled", "synthetic"), *rows])
    if len(lines) == 2:
        lines.append("Not recorded: no recipe.yaml, split.json or metrics beside this card.")
    return lines


def is_loss_weight(key: str) -> bool:
    """A loss term's weight (``recipe.LossCfg`` marks them ``weight``), not one of its settings."""
    import dataclasses

    from .recipe import LossCfg

    fields = {f.name: f for f in dataclasses.fields(LossCfg)}
    return key in fields and bool(fields[key].metadata.get("weight"))


def loss_section(src: CardSources) -> list[str]:
    loss = src.recipe.get("loss")
    if not loss:
        return ["## Losses", "", "Not recorded: no recipe.yaml beside this card."]
    on = {k: v for k, v in loss.items() if is_loss_weight(k) and isinstance(v, (int, float)) and v}
    rows = [(f"`{k}`", f"{v:g}", LOSS_TERMS.get(k, "")) for k, v in on.items()]
    lines = ["## Losses", "", "The recipe's `loss:` weights (terms with weight 0 are off):", ""]
    lines += markdown_table([("term", "weight", "what it is"), *rows])
    shared = [k for k in ("temperature", "label_smoothing") if k in loss and (k != "label_smoothing" or loss[k])]
    own = [k for k in loss if not is_loss_weight(k) and k not in LOSS_SETTINGS and any(k.startswith(f"{t}_")
                                                                                        for t in on)]
    if shared or own:
        lines += ["", "Settings: " + ", ".join(f"{k} {loss[k]}" for k in shared + own) + "."]
    if src.recipe.get("baseline", False):
        lines += ["", "The baseline is the same student trained on the labelled images alone with cross-entropy "
                  "only, for the same steps and images."]
    return lines


def accuracy_section(src: CardSources) -> list[str]:
    m = src.metrics
    if not m or not any(n in m for n in MODELS):
        return ["## Accuracy", "", "Not measured: no metrics.json beside this card."]

    def cell(d, key):
        ci = d.get(f"{key}_ci95")
        return pct(d.get(key)) + (f" ± {ci:.2f}" if ci is not None else "")

    rows = [(n, cell(m[n], "top1"), cell(m[n], "balanced_accuracy"), cell(m[n], "macro_f1"), pct(m[n].get("gflops"), 3))
            for n in MODELS if n in m]
    where = f"on the {m['n_test']} images of the held-out test split" if m.get("n_test") else "on the test split"
    seeds = (f", mean ± 95% Student-t interval over {m['n_seeds']} seeds" if m.get("n_seeds") else "")
    lines = ["## Accuracy", "", f"Percent, {where}{seeds} ({src.metrics_file}); balanced accuracy is the mean of the "
             "per-class recalls.", ""]
    return lines + markdown_table([("model", "top-1 %", "balanced accuracy %", "macro-F1 %", "GFLOPs"), *rows])


def latency_section(src: CardSources) -> list[str]:
    if not src.bench:
        return ["## Latency", "", "Not measured: no bench.json (run `edgedistill bench` on the run or bundle)."]
    host = src.bench[0].get("host") or {}
    isa = ", ".join(host.get("isa") or []) or "ISA unknown"
    gpu = ", ".join(host.get("gpus") or []) or "no GPU"
    lines = ["## Latency", "", f"From bench.json, measured on {host.get('cpu', 'an unrecorded CPU')} "
             f"({host.get('cores', '?')} cores, {isa}; {gpu}; {host.get('os', '')}). Milliseconds per batch.", ""]
    rows = [(r["backend"], r["precision"], r["batch"], pct(r.get("p50_ms")), pct(r.get("p90_ms")),
             pct(r.get("p99_ms")), pct(r.get("throughput_ips"), 1), pct(r.get("x_eager")),
             r.get("runtime_threads") if r.get("runtime_threads") is not None else "–") for r in src.bench]
    header = ("backend", "precision", "batch", "p50 ms", "p90 ms", "p99 ms", "images/s", "x eager", "threads")
    return lines + markdown_table([header, *rows])


def parity_section(src: CardSources) -> list[str]:
    if not src.manifests:
        return ["## Parity", "", "No bundles: the run was not exported (`edgedistill export RUN`)."]
    rows = []
    for name, m in src.manifests.items():
        p, a = m.get("parity") or {}, m.get("accuracy") or {}
        if not p:
            rows.append((name, "not measured", "–", "–", "–", "–", "–"))
            continue
        rows.append((name, f"{p['top1_agreement']:.4f} (>= {p['threshold']}; {p['split']}, {p['images']} images)",
                     f"{p['cosine_min']:.5f}", f"{p['max_abs_error']:.3g}", pct(_percent(a.get("top1"))),
                     pct(_percent(a.get("pytorch_top1"))), "pass" if p.get("passed") else "FAIL"))
    lines = ["## Parity", "", "Each bundle against the PyTorch student, from its manifest.json: top-1 agreement, the "
             "lowest cosine and the largest absolute difference of the scores, and top-1 of both on the same images.",
             ""]
    header = ("bundle", "top-1 agreement", "min cosine", "max abs error", "bundle top-1 %", "PyTorch top-1 %",
              "parity")
    return lines + markdown_table([header, *rows])


def _percent(v):
    return None if v is None else 100.0 * v


def licence_section(src: CardSources) -> list[str]:
    lic = src.licences
    if not lic:
        return ["## Licences", "", "Not recorded: no manifest.json or student/model.pt beside this card."]
    t, g = lic.get("teacher") or {}, lic.get("generator")
    lines = ["## Licences", "", f"- teacher `{t.get('name', '?')}` ({t.get('weights', 'weights not recorded')}): "
             f"{t.get('licence', 'not recorded')}"]
    if g:
        lora = f" + LoRA {g['lora_id']}" if g.get("lora_id") else ""
        lines.append(f"- generator `{g.get('generator', '?')}` ({g.get('model_id') or 'built in code'}{lora}): "
                     f"{g.get('licence', 'not recorded')}")
    else:
        lines.append("- generator: none (no synthetic images)")
    lines.append(f"- student initialisation: {lic.get('student_init', 'not recorded')}")
    licence, _ = hf_licence(licence_texts(src))
    lines += ["", f"The header's `license: {licence}` is derived from the teacher's and generator's licences above "
              "(random weights carry none; `other` when they differ or have no Hub identifier). The student learnt "
              "from these models: check their terms before you use or share it."]
    return lines


def render_card(src: CardSources) -> str:
    """The whole card: the YAML header, then every section."""
    header = yaml.safe_dump(metadata(src), sort_keys=False, allow_unicode=True)
    sections = [title_section(src), teacher_section(src), data_section(src), loss_section(src),
                accuracy_section(src), latency_section(src), parity_section(src), licence_section(src)]
    body = "\n\n".join("\n".join(s) for s in sections)
    return f"---\n{header}---\n\n{body}\n"


# ---------------------------------------------------------------------------------------------------------------
# Writing


def write_bundle_card(bundle_dir) -> Path:
    """``<bundle>/README.md`` from the bundle's manifest and its run's files; returns its path."""
    path = Path(bundle_dir) / "README.md"
    atomic_write_text(path, render_card(gather_bundle(bundle_dir)))
    return path


def write_run_cards(run_dir) -> list[Path]:
    """``RUN/README.md`` and a card in every bundle of the exported student; returns the paths written."""
    run_dir = Path(run_dir)
    written = [write_bundle_card(bundle) for bundle in bundle_folders(exported_dir(run_dir))]
    atomic_write_text(run_dir / "README.md", render_card(gather_run(run_dir)))
    return [run_dir / "README.md", *written]
