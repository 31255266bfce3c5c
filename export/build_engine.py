#!/usr/bin/env python3
"""Build a TensorRT engine from an ONNX bundle, on the device that will run it (Jetson or any NVIDIA GPU).

    python export/build_engine.py RUN/export/onnx-fp32 --precision fp16
    python export/build_engine.py RUN/export/onnx-fp32 --precision int8 --calib calibration.npz

Engines are tied to the TensorRT version and the GPU they were built on, so build them where they run. This
writes ``<bundle's parent>/tensorrt-<precision>/`` with ``model.engine``, the timing cache and a manifest, then
checks the engine against the PyTorch scores the ONNX bundle carries (``reference.npz``). It uses the TensorRT
Python API where ``tensorrt`` imports, else ``trtexec``. No torch needed.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

# As in run.py: a relative import inside the library (edgedistill.runtime), else run.py beside this file.
if __package__:
    from . import run as rt
else:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import run as rt

WORKSPACE_GB = 2


def build_engine(onnx_path, engine_path, precision: str, chw: tuple, calib: np.ndarray | None = None,
                 dynamic: bool = True, max_batch: int = 8, timing_cache=None,
                 workspace_gb: float = WORKSPACE_GB) -> dict:
    """Build with the TensorRT Python API if it imports, else with trtexec; returns build facts for the manifest.

    Args:
        onnx_path: the FP32 ONNX graph (input ``input`` NCHW float32).
        engine_path: where the serialized engine goes (``calibration.cache`` lands beside it for INT8).
        precision: fp32, fp16 or int8 (INT8 lets layers without INT8 kernels run in FP16).
        chw: the input's (C, H, W).
        calib: float32 NCHW calibration inputs, required for INT8 with the Python API.
        dynamic: build a batch 1..max_batch profile; False keeps the graph's static batch.
        timing_cache: a timing-cache file to reuse and update (same TensorRT version and GPU only).
    """
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        if shutil.which("trtexec"):
            return build_with_trtexec(onnx_path, engine_path, precision, chw, dynamic, max_batch, timing_cache)
        raise rt.BundleError("Neither the tensorrt Python package nor trtexec is here. " + rt.INSTALL_HINTS["tensorrt"])
    return build_with_api(onnx_path, engine_path, precision, calib, dynamic, max_batch, timing_cache, workspace_gb)


def build_with_api(onnx_path, engine_path, precision, calib, dynamic, max_batch, timing_cache, workspace_gb) -> dict:
    import tensorrt as trt

    # 1. Parse the ONNX graph into an explicit-batch network.
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(explicit_batch_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise rt.BundleError(f"TensorRT {trt.__version__} cannot parse {onnx_path}: {errors}")
    # 2. Configure precision, workspace, shapes and the timing cache.
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    input_tensor = network.get_input(0)
    size = tuple(input_tensor.shape[1:])
    if dynamic:
        config.add_optimization_profile(shape_profile(builder, input_tensor.name, size, 1, 1, max_batch))
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)  # INT8 builds let layers without INT8 kernels fall back to FP16
    if precision == "int8":
        set_int8_calibration(trt, builder, config, input_tensor.name, size, calib, Path(engine_path).parent, dynamic)
    cache = load_timing_cache(config, timing_cache)
    # 3. Build, then keep the timing cache so the next build (other precision, same GPU) is faster.
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise rt.BundleError(f"TensorRT failed to build an engine from {onnx_path} (see the messages above)")
    rt.write_atomic(engine_path, memoryview(serialized))
    if timing_cache:
        rt.write_atomic(timing_cache, memoryview(config.get_timing_cache().serialize()))
    return {"builder": "tensorrt python api", "tensorrt": trt.__version__, "timing_cache_reused": cache}


def explicit_batch_flags(trt) -> int:
    """TensorRT 10 networks are always explicit-batch (the flag is deprecated); 8.x needs it set."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    major = int(trt.__version__.split(".")[0])
    return 0 if flag is None or major >= 10 else 1 << int(flag)


def shape_profile(builder, name: str, chw: tuple, low: int, opt: int, high: int):
    profile = builder.create_optimization_profile()
    profile.set_shape(name, (low, *chw), (opt, *chw), (high, *chw))
    return profile


def set_int8_calibration(trt, builder, config, name, chw, calib, folder: Path, dynamic: bool):
    if calib is None:
        raise rt.BundleError("INT8 needs calibration images: pass --calib calibration.npz or an image folder")
    config.set_flag(trt.BuilderFlag.INT8)
    calibrator = make_calibrator(trt, calib, folder / "calibration.cache")
    config.int8_calibrator = calibrator
    if dynamic:  # calibration runs at one fixed shape: the calibrator's batch
        config.set_calibration_profile(shape_profile(builder, name, chw, *(calibrator.batch,) * 3))


def make_calibrator(trt, calib: np.ndarray, cache_path: Path, batch: int = 8):
    """An IInt8EntropyCalibrator2 over float32 NCHW inputs (the exporter's calibration images)."""

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batch = min(batch, len(calib))
            self.batches = [calib[i:i + self.batch] for i in range(0, len(calib) - self.batch + 1, self.batch)]
            self.cuda, self.index = rt.CudaMemory(), 0

        def get_batch_size(self):
            return self.batch

        def get_batch(self, names):
            if self.index >= len(self.batches):
                return None
            x = np.ascontiguousarray(self.batches[self.index], dtype=np.float32)
            self.index += 1
            ptr = self.cuda.alloc("calibration", x.nbytes)
            self.cuda.to_device(ptr, x)
            self.cuda.synchronize()
            return [ptr]

        def read_calibration_cache(self):
            return cache_path.read_bytes() if cache_path.is_file() else None

        def write_calibration_cache(self, cache):
            rt.write_atomic(cache_path, bytes(cache))

    return EntropyCalibrator()


def load_timing_cache(config, path) -> bool:
    """Attach the timing cache at ``path`` (an empty one when there is none yet); True when one was reused."""
    data = Path(path).read_bytes() if path and Path(path).is_file() else b""
    cache = config.create_timing_cache(data)
    config.set_timing_cache(cache, ignore_mismatch=False)
    return bool(data)


def build_with_trtexec(onnx_path, engine_path, precision, chw, dynamic, max_batch, timing_cache) -> dict:
    """``trtexec``: FP32/FP16 directly; INT8 only with a calibration cache from an earlier Python-API build."""
    # trtexec writes the engine itself: into a partial file renamed once the build succeeded, never half an engine.
    partial = Path(engine_path).with_name(f".{Path(engine_path).name}.partial")
    cmd = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={partial}"]
    if timing_cache:
        cmd.append(f"--timingCacheFile={timing_cache}")
    if precision in ("fp16", "int8"):
        cmd.append("--fp16")
    if precision == "int8":
        cache = Path(engine_path).parent / "calibration.cache"
        if not cache.is_file():
            raise rt.BundleError("trtexec cannot calibrate INT8 by itself (it would use placeholder scales); "
                                 "install the tensorrt Python package, or put a calibration.cache beside the engine")
        cmd += ["--int8", f"--calib={cache}"]
    if dynamic:
        dims = "x".join(str(d) for d in chw)
        cmd += [f"--minShapes=input:1x{dims}", f"--optShapes=input:1x{dims}", f"--maxShapes=input:{max_batch}x{dims}"]
    help_text = subprocess.run(["trtexec", "--help"], check=False, capture_output=True, text=True).stdout
    cmd.append("--skipInference" if "--skipInference" in help_text else "--buildOnly")
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise rt.BundleError(f"trtexec failed ({' '.join(cmd)}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    os.replace(partial, engine_path)
    version = next((line.split("[TensorRT v")[1].split("]")[0] for line in done.stdout.splitlines()
                    if "[TensorRT v" in line), "unknown")
    return {"builder": "trtexec", "tensorrt": version, "command": " ".join(cmd)}


def load_calibration(path, spec: dict, limit: int = 512) -> np.ndarray:
    """Calibration inputs from an .npz (``pixels`` uint8 NHWC, as the exporter writes) or a folder of images."""
    path = Path(path)
    if path.suffix == ".npz":
        pixels = np.load(path)["pixels"][:limit]
    else:
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".webp"))
        pixels = [rt.input_pixels(rt.load_image(p), spec) for p in files[:limit]]
    if len(pixels) == 0:
        raise rt.BundleError(f"No calibration images in {path}")
    return np.stack([rt.normalize(p, spec) for p in pixels])


def engine_manifest(source: dict, precision: str, facts: dict, files: list, folder: Path) -> dict:
    manifest = json.loads(json.dumps(source))  # deep copy: preprocessing, classes, licences carry over unchanged
    manifest.update(format="tensorrt", precision=precision, model_file="model.engine",
                    runtime={"name": "tensorrt", **facts}, quantization=None, parity=None, accuracy=None)
    manifest["versions"] = {**source.get("versions", {}), "tensorrt": facts.get("tensorrt")}
    manifest["files"] = {name: rt.sha256_file(folder / name) for name in files}
    return manifest


def build_bundle(onnx_bundle, precision: str, out=None, calib=None, max_batch: int = 8, threshold=None) -> Path:
    """Engine bundle from an ONNX FP32 bundle, checked against the PyTorch scores it carries."""
    # 1. Read and verify the source bundle.
    src = Path(onnx_bundle)
    source = rt.read_manifest(src)
    rt.verify_files(src, source)
    if source["format"] != "onnx" or source["precision"] != "fp32":
        raise rt.BundleError(f"Build engines from an onnx-fp32 bundle; {src} is {source['format']}-"
                             f"{source['precision']}")
    folder = Path(out) if out else src.parent / f"tensorrt-{precision}"
    folder.mkdir(parents=True, exist_ok=True)
    # 2. Build the engine (the timing cache lives beside the bundles, shared by every precision).
    calib_x = load_calibration(calib, source["preprocess"]) if calib else None
    facts = build_engine(src / "model.onnx", folder / "model.engine", precision, tuple(source["input"]["shape"][1:]),
                         calib_x,
                         dynamic=source["input"]["batch"] is None, max_batch=max_batch,
                         timing_cache=folder.parent / "tensorrt-timing.cache")
    shutil.copyfile(src / "reference.npz", folder / "reference.npz")
    # 3. Write the manifest, then check the engine against PyTorch's scores.
    manifest = engine_manifest(source, precision, facts, ["model.engine", "reference.npz"], folder)
    rt.write_atomic(folder / rt.MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    parity = rt.reference_check(rt.load_bundle(folder))
    limit = threshold if threshold is not None else (0.97 if precision == "int8" else 0.995)
    manifest["parity"] = {**parity, "source": "reference.npz (held-out images stored at export)",
                          "threshold": limit, "passed": parity["top1_agreement"] >= limit}
    rt.write_atomic(folder / rt.MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    if not manifest["parity"]["passed"]:
        raise rt.BundleError(f"{folder}: top-1 agreement with PyTorch {parity['top1_agreement']:.3f} < {limit}")
    return folder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Build and check a TensorRT engine from an edgedistill ONNX bundle")
    p.add_argument("bundle", help="an onnx-fp32 bundle folder")
    p.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "int8"])
    p.add_argument("--calib", default=None, help="INT8: calibration.npz from the exporter, or a folder of images")
    p.add_argument("--out", default=None, help="output bundle folder (default: beside the source bundle)")
    p.add_argument("--max-batch", type=int, default=8, help="largest batch of the dynamic-shape profile")
    args = p.parse_args(argv)
    try:
        folder = build_bundle(args.bundle, args.precision, args.out, args.calib, args.max_batch)
    except (rt.BundleError, ImportError) as e:
        print(f"build_engine.py: error: {e}", file=sys.stderr)
        return 2
    print(f"Wrote {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
