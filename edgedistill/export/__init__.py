"""Export a trained student to deployable bundles, each checked against PyTorch before it is kept.

One table (``FORMATS``) drives the command line, the recipe validation and the docs. Every bundle lands in
``RUN/export/<format>-<precision>/`` with a ``manifest.json`` (preprocessing, classes, versions, sha256, parity,
accuracy, licences) and a model card ``README.md`` (``card.py``), and runs on a target with ``export/run.py`` alone.

Nothing heavy is imported here: each backend module imports its library inside the function that needs it.
"""
import importlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..utils import atomic_write_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportFormat:
    name: str
    precisions: tuple
    extra: str          # pip extra that installs the exporter
    runtime: str        # what runs the bundle on the target
    model_file: str
    description: str


FORMATS = {f.name: f for f in (
    ExportFormat("onnx", ("fp32", "int8"), "onnx", "onnxruntime", "model.onnx",
                 "ONNX (opset >= 17, static or dynamic batch); INT8 is ONNX Runtime static QDQ quantization"),
    ExportFormat("openvino", ("fp32", "fp16", "int8"), "openvino", "openvino", "model.xml",
                 "OpenVINO IR; FP16 compresses the weights; INT8 is NNCF post-training quantization"),
    ExportFormat("tensorrt", ("fp32", "fp16", "int8"), "tensorrt", "tensorrt", "model.engine",
                 "TensorRT engine, built on the target GPU (Python API, or trtexec); INT8 entropy calibration"),
)}
PRECISIONS = ("fp32", "fp16", "int8")


class ExportError(RuntimeError):
    """An export failed, most often its parity check: the artifact disagrees with the PyTorch student."""


def supported_pairs() -> str:
    return "; ".join(f"{f.name}: {', '.join(f.precisions)}" for f in FORMATS.values())


def formats_markdown() -> str:
    """The format table as markdown, for the docs."""
    rows = [f"| `{f.name}` | {', '.join(f.precisions)} | `{f.runtime}` | `pip install 'edgedistill[{f.extra}]'` | "
            f"{f.description} |" for f in FORMATS.values()]
    return "\n".join(["| format | precisions | target runtime | install | notes |", "|---|---|---|---|---|", *rows])


def check_export_request(formats, precisions):
    """Every format is known and supports every requested precision; raises RecipeError naming the valid pairs."""
    import difflib

    from ..recipe import RecipeError

    if not formats or not precisions:
        raise RecipeError(f"Export needs at least one format and one precision. Supported: {supported_pairs()}")
    for name in formats:
        if name not in FORMATS:
            close = difflib.get_close_matches(name, FORMATS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise RecipeError(f"Unknown export format {name!r}.{hint} Supported: {supported_pairs()}")
    for precision in precisions:
        if precision not in PRECISIONS:
            raise RecipeError(f"Unknown precision {precision!r}; choose from {list(PRECISIONS)}")
    bad = [f"{n}-{p}" for n in formats for p in precisions if p not in FORMATS[n].precisions]
    if bad:
        raise RecipeError(f"Unsupported format/precision pair(s) {bad}. Supported: {supported_pairs()}")


def backend(name: str):
    """The module that exports format ``name`` (``edgedistill.export.<name>``)."""
    return importlib.import_module(f"{__name__}.{name}")


def resolve_cfg(run_dir: Path, formats, precisions, cfg):
    """The ExportCfg to use: explicit formats/precisions override ``cfg``, then the run's recipe, then onnx-fp32."""
    from dataclasses import replace

    from ..recipe import ExportCfg

    if cfg is None:
        cfg = recipe_export_cfg(run_dir) or ExportCfg()
    if formats:
        cfg = replace(cfg, formats=tuple(formats))
    if precisions:
        cfg = replace(cfg, precision=tuple(precisions))
    check_export_request(cfg.formats, cfg.precision)
    return cfg


def recipe_export_cfg(run_dir: Path):
    import yaml

    from ..recipe import ExportCfg, build

    path = run_dir / "recipe.yaml"
    if not path.is_file():
        return None
    section = (yaml.safe_load(path.read_text()) or {}).get("export")
    return build(ExportCfg, section, "export") if section else None


def usable_formats(cfg) -> list:
    """Formats that can run here; missing Python packages fail all at once, a missing TensorRT/GPU is skipped."""
    from ..utils import require

    missing, usable = [], []
    for name in cfg.formats:
        reason = backend(name).unavailable()
        if reason and FORMATS[name].extra == "tensorrt":
            log.warning(reason)
            continue
        if reason:
            missing.append(reason)
        usable.append(name)
    if "int8" in cfg.precision and "onnx" in usable:
        try:
            require("onnxruntime.quantization", "onnx")
        except ImportError as e:
            missing.append(str(e))
    if missing:
        raise ImportError(" ".join(missing))
    return usable


def export_run(run_dir, formats=None, precisions=None, cfg=None) -> list:
    """Export a run's student to every requested format and precision, gated on parity with PyTorch.

    Args:
        run_dir: a run folder (``RUN/student/model.pt``, ``RUN/split.json``).
        formats: e.g. ``["onnx", "openvino"]``; None: ``cfg``'s, else the recipe's export section, else onnx.
        precisions: e.g. ``["fp32", "int8"]``; None as for ``formats``.
        cfg: an ``ExportCfg`` (thresholds, opset, calibration and selection image counts).

    Returns:
        The bundle folders written. Raises ExportError after trying every pair when any failed its parity check.
    """
    from ..card import write_bundle_card
    from .bundle import ExportJob, summary_table

    # 1. Validate the request and the backends before any work.
    run_dir = Path(run_dir)
    cfg = resolve_cfg(run_dir, formats, precisions, cfg)
    usable = usable_formats(cfg)
    if not usable:
        return []
    # 2. Load the student, the test and selection images and PyTorch's scores on them once for every artifact.
    job = ExportJob.create(run_dir, cfg)
    job.save_selection()
    if "tensorrt" in cfg.formats and "int8" in cfg.precision:
        job.save_calibration()  # for INT8 engines built on the device
    # 3. Export, check and write each bundle; FP32 first so lower precisions are compared with it.
    results = [export_one(job, name, p) for name in usable for p in sorted(cfg.precision, key=PRECISIONS.index)
               if p in FORMATS[name].precisions]
    log.info("Export summary for %s:\n%s", run_dir, summary_table(results))
    atomic_write_text(job.out_root / "summary.md", summary_table(results) + "\n")
    for r in results:  # a model card (README.md) in each bundle, from its manifest and the run's files
        write_bundle_card(r["path"])
    shutil.rmtree(job.out_root / ".work", ignore_errors=True)
    failed = [r for r in results if not r["parity"]["passed"]]
    if failed:
        raise ExportError("Parity check failed, these artifacts disagree with the PyTorch student: "
                          + "; ".join(failure_line(r) for r in failed) + f". Manifests and summary.md are in "
                          f"{job.out_root}; the thresholds are the recipe keys export.min_agreement and "
                          f"export.min_agreement_int8.")
    return [r["path"] for r in results]


def failure_line(result: dict) -> str:
    p, a = result["parity"], result["accuracy"]
    line = (f"{result['name']}: top-1 agreement {p['top1_agreement']:.3f} < {p['threshold']} on {p['images']} "
            f"split {p['split']} images")
    if a["top1"] is not None and a["fp32_top1"] is not None:
        line += f" (accuracy {100 * a['top1']:.1f}% vs FP32 {100 * a['fp32_top1']:.1f}%)"
    return line


def export_one(job, name: str, precision: str) -> dict:
    """Build one bundle: walk the backend's attempts, choose one on the selection split, then test it, once.

    Every attempt of the ladder (e.g. INT8 with some layers in float, INT8-aware fine-tuning) is built and scored by
    its top-1 agreement with PyTorch on the selection split; the best ships (the earlier, cheaper one on a tie).
    A last-resort attempt (``LAST_RESORT``: NNCF accuracy control) runs only when no other reached the gate plus
    ``export.selection_margin``. Stopping at the first attempt over the gate would ship whichever crossed it by a
    single lucky selection image. Only the chosen bundle is measured on the test split, and that measurement alone
    decides pass or fail: test-split figures never choose between attempts, so they are not selected for.
    """
    from .bundle import finish_bundle
    from .parity import evaluate_artifact, selection_agreement, threshold

    # 1. Walk the ladder, judging each attempt on the selection split.
    gate = min(1.0, threshold(job.cfg, precision) + job.cfg.selection_margin)
    tried = []  # (folder, attempt, agreement on the selection split)
    for i, attempt in enumerate(ladder(job, name, precision)):
        if attempt.get("mode") in LAST_RESORT and any(o["top1_agreement"] >= gate for _, _, o in tried):
            continue
        folder = build_attempt(job, name, precision, i, attempt)
        tried.append((folder, attempt, selection_agreement(job, folder)))
        log.info("%s-%s %s: top-1 agreement %.4f on the selection split (gate %.3f)", name, precision, attempt or "",
                 tried[-1][2]["top1_agreement"], gate)
    # 2. Keep the best on selection (the earlier, cheaper attempt on a tie).
    chosen = max(range(len(tried)), key=lambda i: (tried[i][2]["top1_agreement"], -i))
    for i, (folder, _, _) in enumerate(tried):
        if i != chosen:
            shutil.rmtree(folder)
    folder, _, agreement = tried[chosen]
    # 3. The parity gate, on the whole test split, for the chosen attempt only.
    outcome = evaluate_artifact(job, folder, precision)
    selection = {"split": job.selection.split, "images": agreement["images"], "source": job.selection.source,
                 "top1_agreement": agreement["top1_agreement"], "cosine_mean": agreement["cosine_mean"],
                 "gate": gate, "margin": job.cfg.selection_margin, "reached_gate": agreement["top1_agreement"] >= gate,
                 "chosen_attempt": chosen, "rule": "the best selection agreement among all attempts (the earlier on "
                 "a tie); accuracy control only when none reached the gate",
                 **{k: v for k, v in job.pools.selection_info.items() if k in ("requested", "seed", "note")}}
    attempts = [{**a, "selection_agreement": o["top1_agreement"]} for _, a, o in tried]
    return finish_bundle(job, folder, {**outcome, "selection": selection, "attempts": attempts})


LAST_RESORT = ("accuracy_control",)  # slow attempts tried only when every other attempt missed the gate


def ladder(job, name: str, precision: str) -> list:
    """The backend's attempts for ``precision``, less INT8-aware fine-tuning when the recipe turns it off."""
    return [a for a in backend(name).attempts(precision) if job.cfg.int8_finetune_steps > 0 or not a.get("finetune")]


def build_attempt(job, name: str, precision: str, i: int, attempt: dict) -> Path:
    """Export attempt ``i`` into ``RUN/export/.<format>-<precision>.try<i>`` with a manifest the runtime can open."""
    from .bundle import start_bundle

    folder = job.out_root / f".{name}-{precision}.try{i}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    start_bundle(job, folder, FORMATS[name], precision, backend(name).export_bundle(job, folder, precision, **attempt))
    return folder
