"""Bundles: the inputs an export job shares across formats, and ``manifest.json`` with sha256, versions, licences.

A bundle is ``RUN/export/<format>-<precision>/``: the artifact files, ``reference.npz`` (a few preprocessed
held-out images with PyTorch's scores on them) and ``manifest.json``, which holds everything a target needs to
feed the model exactly what the PyTorch student saw and to tell whether the files were altered since.
"""
import datetime
import importlib.metadata
import logging
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..host import host_profile
from ..utils import read_json, sha256_file, write_json
from .images import Pools, image_pools, read_split, to_inputs
from .parity import ParitySet, image_set, store_reference

log = logging.getLogger(__name__)
VERSIONED = ("edgedistill", "numpy", "pillow", "torch", "timm", "onnx", "onnxruntime", "openvino", "nncf", "tensorrt")


@dataclass
class ExportJob:
    """One export of one run: the student, its preprocessing and the images every format is checked on."""

    run_dir: Path
    cfg: object                 # recipe.ExportCfg
    model: object               # students.LogitsOnly, eval mode
    saved: dict                  # what load_student returned besides the model
    split: dict
    parity: ParitySet           # the held-out test split: pass/fail, measured once per bundle
    pools: Pools                # which images are for what (parity, selection, calibration), disjoint
    selection: ParitySet        # chooses between INT8 attempts, fine-tuning steps and float layers
    fp32_top1: dict = field(default_factory=dict)   # format -> its FP32 artifact's accuracy, for the report
    _calibration: tuple | None = None
    _onnx: Path | None = None
    _sensitivity: list | None = None   # quantize.sensitivity_ranking, computed once per job
    _finetuned: dict = field(default_factory=dict)   # keep -> (INT8-aware fine-tuned student's ONNX, its record)

    @classmethod
    def create(cls, run_dir: Path, cfg) -> "ExportJob":
        from ..students import LogitsOnly, load_student

        student, saved = load_student(run_dir)
        model = LogitsOnly(student).eval()
        split = read_split(run_dir)
        pools = image_pools(run_dir, split, saved.get("recipe") or {}, cfg)
        spec = saved["input"]
        parity = image_set(run_dir, pools.parity, pools.parity_split, parity_source(pools), spec, model)
        info = pools.selection_info
        selection = image_set(run_dir, pools.selection, info["split"], info["source"], spec, model, seed=1)
        return cls(run_dir, cfg, model, saved, split, parity, pools, selection)

    def save_selection(self) -> Path:
        """``RUN/export/selection.json``: the selection images by path, so anyone can check they were held out."""
        path = self.out_root / "selection.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {**self.pools.selection_info, "items": [list(item) for item in self.pools.selection]})
        return path

    @property
    def spec(self) -> dict:
        return dict(self.saved["input"])

    @property
    def out_root(self) -> Path:
        return self.run_dir / "export"

    def calibration_pixels(self) -> tuple[np.ndarray, dict]:
        """INT8 calibration pixels (uint8 NHWC, loaded once per job) and where they came from."""
        from .quantize import calibration_set

        if self._calibration is None:
            self._calibration = calibration_set(self.pools, self.spec, self.cfg.calibration_images)
        return self._calibration

    def calibration(self) -> tuple[np.ndarray, dict]:
        """INT8 calibration inputs (float32 NCHW) and where they came from."""
        pixels, info = self.calibration_pixels()
        return to_inputs(pixels, self.spec), info

    def save_calibration(self) -> Path:
        """``RUN/export/calibration.npz``: the calibration pixels, for ``export/build_engine.py --calib``."""
        path = self.out_root / "calibration.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, pixels=self.calibration_pixels()[0])
        return path

    def onnx_fp32(self) -> Path:
        """The FP32 ONNX graph every format starts from, exported once per job."""
        from .onnx import export_onnx

        if self._onnx is None:
            path = self.out_root / ".work" / "model.onnx"
            self._onnx = export_onnx(self.model, path, int(self.spec["size"]), self.cfg.opset, self.cfg.dynamic_batch,
                                     self.cfg.simplify)
        return self._onnx

    def source_onnx(self, finetune: bool = False, keep: int = 0) -> tuple[Path, dict | None]:
        """The FP32 ONNX graph a quantizer starts from: the student's, or (``finetune``) that of its INT8-aware
        fine-tuned copy with ``keep`` layers left float; and the fine-tuning record for the manifest."""
        from .onnx import export_onnx
        from .quantize import finetuned_student

        if not finetune:
            return self.onnx_fp32(), None
        if keep not in self._finetuned:   # minutes of training: once per job, shared by every backend
            model, info = finetuned_student(self, keep)
            path = self.out_root / ".work" / f"model-int8-finetuned-{keep}.onnx"
            self._finetuned[keep] = (export_onnx(model, path, int(self.spec["size"]), self.cfg.opset,
                                                 self.cfg.dynamic_batch, self.cfg.simplify), info)
        return self._finetuned[keep]


def parity_source(pools: Pools) -> str:
    """Where the parity images come from, in words; says so loudly when they are not the whole test split."""
    n, total, name = len(pools.parity), pools.parity_split_images, pools.parity_split
    if name == "val":
        log.warning("The run has no test split: parity is measured on split val, and INT8 attempts are chosen on "
                    "a hold-back from train")
    if n < total:
        log.warning("Parity is measured on the first %d of the %d split %s images (export.parity_images caps it)",
                    n, total, name)
        return f"split {name} (real, held out): the first {n} of {total} images (export.parity_images)"
    return f"split {name} (real, held out): all {n} images"


def output_meaning(student) -> dict:
    if student.classifier is not None:
        return {"kind": "logits", "meaning": "class logits from the classifier head; softmax gives probabilities"}
    if student.zero_shot is not None:
        return {"kind": "zero_shot_scores", "meaning": "zero-shot class scores: scale x cosine similarity between "
                "the image embedding and each class's text embedding (baked into the graph); softmax gives "
                "probabilities", "scale": float(student.zero_shot.scale)}
    return {"kind": "embedding", "meaning": "image embedding in the teacher's feature space (no class head)"}


def preprocess_record(spec: dict) -> dict:
    """``spec`` as ``run.preprocess`` takes it, plus the same steps in words for people porting it."""
    size = int(spec["size"])
    return {**spec, "channel_order": "RGB", "layout": "NCHW", "scale": 1 / 255,
            "steps": ["decode to 8-bit RGB (alpha composited on white)",
                      f"centre square crop of crop_pct={spec.get('crop_pct', 1.0)} x the shorter side",
                      f"resize to {size}x{size} with PIL {spec.get('interpolation', 'bicubic')}",
                      "divide by 255, subtract mean, divide by std (per RGB channel)", "HWC -> CHW, add batch"]}


def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for dist in VERSIONED:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def licences(saved: dict) -> dict:
    """The teacher's and generator's weights and licences, carried forward from the run into every artifact."""
    extra = saved.get("extra") or {}
    student = saved.get("recipe", {}).get("student", {})
    return {"teacher": extra.get("teacher"), "generator": extra.get("generator"),
            "student_init": student.get("packaged_weights")
            or ("timm pretrained" if student.get("pretrained") else "random")}


def start_bundle(job: ExportJob, folder: Path, fmt, precision: str, info: dict):
    """Write the manifest for freshly exported files (parity still to come) so the target runtime can open them."""
    classes = list(job.saved["class_names"])
    batch = None if job.cfg.dynamic_batch else 1
    size = int(job.spec["size"])
    files = [*info["files"], store_reference(folder, job.parity)]
    manifest = {
        "format": fmt.name, "precision": precision, "model_file": fmt.model_file,
        "runtime": info["runtime"],
        "input": {"name": "input", "dtype": "float32", "layout": "NCHW", "shape": [batch or "batch", 3, size, size],
                  "batch": batch},
        "preprocess": preprocess_record(job.spec),
        "output": {"name": "scores", "shape": [batch or "batch", len(classes)], **output_meaning(job.model.student)},
        "class_names": classes,
        "opset": info.get("opset"),
        "quantization": info.get("quantization"),
        "versions": library_versions(),
        "host": host_profile(),  # the export host: parity was measured here (INT8 rounding depends on the ISA)
        "licences": licences(job.saved),
        "source": {"run": str(job.run_dir.resolve()), "student": job.saved.get("recipe", {}).get("student", {}),
                   "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
        "files": {name: sha256_file(folder / name) for name in files},
    }
    write_json(folder / "manifest.json", manifest)


def finish_bundle(job: ExportJob, folder: Path, outcome: dict) -> dict:
    """Record parity and accuracy, then move the bundle into place (replacing an older one)."""
    manifest = read_json(folder / "manifest.json")
    name = f"{manifest['format']}-{manifest['precision']}"
    accuracy = outcome["accuracy"]
    if manifest["precision"] == "fp32":
        job.fp32_top1[manifest["format"]] = accuracy["top1"]
    fp32 = job.fp32_top1.get(manifest["format"], accuracy["pytorch_top1"])
    accuracy["fp32_top1"] = fp32
    accuracy["delta_vs_fp32"] = None if fp32 is None or accuracy["top1"] is None else accuracy["top1"] - fp32
    manifest.update(selection=outcome["selection"], parity=outcome["parity"], accuracy=accuracy)
    manifest["parity"]["reference_check"] = export_host_reference(folder)
    if manifest.get("quantization"):
        manifest["quantization"]["attempts"] = outcome["attempts"]
    write_json(folder / "manifest.json", manifest)
    final = job.out_root / name
    shutil.rmtree(final, ignore_errors=True)
    folder.rename(final)
    return {"name": name, "path": final, "selection": manifest["selection"], "parity": manifest["parity"],
            "accuracy": accuracy}


def export_host_reference(folder: Path) -> dict | None:
    """``run.py verify``'s figures on this (the export) host, for a device to compare its own with; None when the
    bundle cannot run here (a TensorRT engine is built on its device)."""
    from ..runtime.run import BundleError, load_bundle, reference_check

    try:
        return reference_check(load_bundle(folder, verify=False))
    except (BundleError, ImportError, RuntimeError) as e:
        log.info("no export-host reference check for %s: %s", folder.name, e)
        return None


def summary_table(results: list) -> str:
    """Markdown: agreement on the selection split (what chose the attempt), then on the test split (what decides
    pass or fail) with cosine, max-abs error and accuracy beside FP32's."""
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    rows = ["| artifact | selection agreement | test top-1 agreement | min cosine | max abs err | top-1 % | "
            "FP32 top-1 % | parity |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        p, a, s = r["parity"], r["accuracy"], r["selection"]
        rows.append(f"| {r['name']} | {s['top1_agreement']:.3f} ({s['split']}, {s['images']}) | "
                    f"{p['top1_agreement']:.3f} (>= {p['threshold']}; {p['split']}, {p['images']}) | "
                    f"{p['cosine_min']:.4f} | {p['max_abs_error']:.3g} | {pct(a['top1'])} | {pct(a['fp32_top1'])} | "
                    f"{'pass' if p['passed'] else 'FAIL'} |")
    return "\n".join(rows)
