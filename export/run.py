#!/usr/bin/env python3
"""edgedistill target runtime: run an exported bundle with numpy, pillow and one runtime. No torch needed.

    python export/run.py predict BUNDLE IMAGE [IMAGE ...]
    python export/run.py bench BUNDLE [--batch 1,8] [--iters 50]
    python export/run.py verify BUNDLE

Images are preprocessed by ``preprocess.py`` beside this file, the implementation edgedistill itself imports for its
views (as ``edgedistill.runtime``): the model sees the student's exact tensor. Copy the whole ``export/`` folder.
"""
import argparse
import hashlib
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

# Two ways in, one preprocess.py. Inside the library (edgedistill.runtime, a package whose __path__ is this
# folder) __package__ is set and the import is relative, so it can only mean the sibling file. As a script
# (python export/run.py from any cwd, on a device that has only this folder) or a top-level `import run`, it is the
# sibling by its plain name, with this folder first on sys.path: `python -P` and `-I` leave a script's folder off it.
if __package__:
    from .hostinfo import cpu_profile
    from .preprocess import load_image, normalize, preprocess
    from .timing import bench_bundle
else:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from hostinfo import cpu_profile
    from preprocess import load_image, normalize, preprocess
    from timing import bench_bundle

# ---------------------------------------------------------------------------------------------------------------
# Bundles: a folder with manifest.json and the artifact files it lists with their sha256.

MANIFEST = "manifest.json"
INSTALL_HINTS = {
    "onnxruntime": "pip install onnxruntime (or onnxruntime-gpu)",
    "openvino": "pip install openvino",
    "tensorrt": "TensorRT ships with JetPack on Jetson (apt install python3-libnvinfer); elsewhere pip install "
                "tensorrt cuda-python",
}


class BundleError(RuntimeError):
    """A bundle is missing files, was altered after export, or cannot run here."""


def require_runtime(module: str):
    """Import a runtime or fail with the install command for the target."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"This bundle needs {module!r}: {INSTALL_HINTS.get(module, 'pip install ' + module)}") from e


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_atomic(path, data: bytes):
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``: a reader (or a re-run after
    a kill) sees the old file or the whole new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_manifest(path) -> dict:
    path = Path(path)
    file = path / MANIFEST if path.is_dir() else path
    if not file.is_file():
        raise BundleError(f"{path} is not an edgedistill bundle: no {MANIFEST} (run `edgedistill export RUN` first)")
    return json.loads(file.read_text())


def bundle_path(root: Path, name: str) -> Path:
    """``root / name``, refused when ``name`` leads outside the bundle (an absolute path, ``..``, a link out)."""
    path = (root / name).resolve()
    try:
        path.relative_to(root.resolve())  # raises when not below root (Path.is_relative_to needs 3.9; JetPack 5: 3.8)
        outside = Path(name).is_absolute()
    except ValueError:
        outside = True
    if outside:
        raise BundleError(f"Bundle {root}: its manifest points outside the bundle ({name!r}); refusing to load it")
    return path


def verify_files(root: Path, manifest: dict):
    """Every file the manifest lists lies inside the bundle, exists and has the recorded sha256; the model file the
    runtime will open is one of them."""
    model_file = manifest["model_file"]
    if model_file not in manifest["files"]:
        raise BundleError(f"Bundle {root}: {model_file} is not in the manifest's sha256 table, so it cannot be "
                          "checked; refusing to load it. Re-export the bundle.")
    for name, expected in manifest["files"].items():
        path = bundle_path(root, name)
        if not path.is_file():
            raise BundleError(f"Bundle {root} is incomplete: {name} is missing")
        actual = sha256_file(path)
        if actual != expected:
            raise BundleError(f"Bundle {root}: {name} changed after export (sha256 {actual[:12]}..., manifest says "
                              f"{expected[:12]}...). Re-export it, or copy the bundle again.")


class Bundle:
    """An exported student: ``predict`` maps a float32 NCHW batch (preprocessed) to class scores [B, K]."""

    def __init__(self, root: Path, manifest: dict, run):
        self.root, self.manifest, self._run = root, manifest, run

    @property
    def class_names(self) -> list:
        return self.manifest["class_names"]

    @property
    def spec(self) -> dict:
        """The preprocessing the exporter recorded, in the form ``preprocess(img, spec)`` takes."""
        return self.manifest["preprocess"]

    @property
    def name(self) -> str:
        return f"{self.manifest['format']}-{self.manifest['precision']}"

    @property
    def settings(self) -> dict:
        """How the runtime session runs, as it reports it: ``runtime_threads``, ``providers`` (where known)."""
        return dict(getattr(self._run, "settings", {}))

    def preprocess(self, img: Image.Image) -> np.ndarray:
        return preprocess(img, self.spec)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4:
            raise ValueError(f"predict takes a float32 NCHW batch, got shape {batch.shape}")
        fixed = self.manifest["input"]["batch"]
        if fixed and len(batch) != fixed:  # static-batch artifact: run it in chunks of its batch size
            return np.concatenate([self._run(padded(chunk, fixed))[: len(chunk)]
                                   for chunk in np.array_split(batch, range(fixed, len(batch), fixed))])
        return np.asarray(self._run(batch), dtype=np.float32)

    def predict_images(self, images) -> np.ndarray:
        return self.predict(np.stack([self.preprocess(img) for img in images]))


def padded(chunk: np.ndarray, n: int) -> np.ndarray:
    if len(chunk) == n:
        return chunk
    return np.concatenate([chunk, np.repeat(chunk[-1:], n - len(chunk), axis=0)])


def load_bundle(path, threads: int = 0, verify: bool = True, device: str = "") -> Bundle:
    """Open an exported bundle with the runtime its manifest names.

    Args:
        path: the bundle folder (``RUN/export/<format>-<precision>``).
        threads: CPU threads for the runtime; 0 keeps the runtime's default.
        verify: check the sha256 of every file first.
        device: runtime device (OpenVINO ``CPU``/``GPU``/...); empty for the runtime's default.
    """
    root = Path(path)
    manifest = read_manifest(root)
    if verify:
        verify_files(root, manifest)
    if manifest.get("parity", {}).get("passed") is False:
        warnings.warn(f"Bundle {root} failed its parity check at export; its predictions may differ from PyTorch")
    runner = RUNNERS.get(manifest["format"])
    if runner is None:
        raise BundleError(f"Bundle {root} has format {manifest['format']!r}; this runtime knows {sorted(RUNNERS)}")
    bundle_path(root, manifest["model_file"])  # even unverified, a bundle never opens a file outside itself
    return Bundle(root, manifest, runner(root, manifest, threads, device))


# ---------------------------------------------------------------------------------------------------------------
# Backends: each returns a function float32 NCHW -> scores, importing its runtime only when called.


def onnxruntime_runner(root: Path, manifest: dict, threads: int, device: str):
    ort = require_runtime("onnxruntime")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device != "CPU" else ["CPUExecutionProvider"]
    providers = [p for p in wanted if p in ort.get_available_providers()]
    session = ort.InferenceSession(str(root / manifest["model_file"]), options, providers=providers)
    name = session.get_inputs()[0].name

    def run(x):
        return session.run(None, {name: x})[0]
    # As the session reports them (intra_op_num_threads 0: ONNX Runtime's default, one per physical core).
    run.settings = {"runtime_threads": session.get_session_options().intra_op_num_threads,
                    "providers": list(session.get_providers())}
    return run


def openvino_runner(root: Path, manifest: dict, threads: int, device: str):
    ov = require_runtime("openvino")
    core = ov.Core()
    config = {"PERFORMANCE_HINT": "LATENCY"}
    precision = manifest.get("runtime", {}).get("inference_precision")
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    model = core.read_model(str(root / manifest["model_file"]))
    compiled = core.compile_model(model, device or "CPU", config)
    request = compiled.create_infer_request()

    def run(x):
        request.infer({0: x})
        return request.get_output_tensor(0).data.copy()
    run.settings = {"runtime_threads": int(compiled.get_property("INFERENCE_NUM_THREADS")),
                    "providers": [str(d) for d in compiled.get_property("EXECUTION_DEVICES")]}
    return run


def tensorrt_runner(root: Path, manifest: dict, threads: int, device: str):
    trt = require_runtime("tensorrt")
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine((root / manifest["model_file"]).read_bytes())
    if engine is None:
        raise BundleError(f"TensorRT {trt.__version__} cannot load {root / manifest['model_file']}: engines only run "
                          f"with the TensorRT version and GPU they were built with "
                          f"(built with {manifest.get('versions', {}).get('tensorrt')}); rebuild it with "
                          f"export/build_engine.py on this device")
    return TensorRTRunner(trt, engine)


class TensorRTRunner:
    """Runs an engine through the name-based I/O API (TensorRT >= 8.5) with cuda-python or pycuda buffers."""

    def __init__(self, trt, engine):
        self.trt, self.engine, self.cuda = trt, engine, CudaMemory()
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input = next(n for n in names if engine.get_tensor_mode(n) == mode)
        self.output = next(n for n in names if engine.get_tensor_mode(n) != mode)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        trt, cuda = self.trt, self.cuda
        self.context.set_input_shape(self.input, tuple(x.shape))
        shape = tuple(self.context.get_tensor_shape(self.output))
        out = np.empty(shape, dtype=trt.nptype(self.engine.get_tensor_dtype(self.output)))
        x = x.astype(trt.nptype(self.engine.get_tensor_dtype(self.input)), copy=False)
        d_in, d_out = cuda.alloc(self.input, x.nbytes), cuda.alloc(self.output, out.nbytes)
        self.context.set_tensor_address(self.input, d_in)
        self.context.set_tensor_address(self.output, d_out)
        cuda.to_device(d_in, x)
        self.context.execute_async_v3(cuda.stream)
        cuda.to_host(out, d_out)
        return out.astype(np.float32)


class CudaMemory:
    """Device buffers (grown as needed, reused between calls) through cuda-python, else pycuda."""

    def __init__(self):
        self.buffers = {}
        try:
            try:
                from cuda.bindings import runtime as cudart  # cuda-python >= 12.8
            except ImportError:
                from cuda import cudart
            self.cudart, self.stream = cudart, check_cuda(cudart.cudaStreamCreate())
        except ImportError:
            self.cudart = None
            pycuda = require_runtime("pycuda.driver")
            require_runtime("pycuda.autoinit")
            self.pycuda, self.stream_obj = pycuda, pycuda.Stream()
            self.stream = self.stream_obj.handle

    def alloc(self, name: str, nbytes: int) -> int:
        ptr, size = self.buffers.get(name, (None, 0))
        if size < nbytes:
            ptr = check_cuda(self.cudart.cudaMalloc(nbytes)) if self.cudart else self.pycuda.mem_alloc(nbytes)
            self.buffers[name] = (ptr, nbytes)
        return int(ptr)

    def to_device(self, ptr: int, x: np.ndarray):
        if self.cudart:
            kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            check_cuda(self.cudart.cudaMemcpyAsync(ptr, x.ctypes.data, x.nbytes, kind, self.stream))
        else:
            self.pycuda.memcpy_htod_async(ptr, x, self.stream_obj)

    def to_host(self, out: np.ndarray, ptr: int):
        if self.cudart:
            kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            check_cuda(self.cudart.cudaMemcpyAsync(out.ctypes.data, ptr, out.nbytes, kind, self.stream))
        else:
            self.pycuda.memcpy_dtoh_async(out, ptr, self.stream_obj)
        self.synchronize()

    def synchronize(self):
        if self.cudart:
            check_cuda(self.cudart.cudaStreamSynchronize(self.stream))
        else:
            self.stream_obj.synchronize()


def check_cuda(result):
    """cuda-python calls return (error, *values); raise on an error, return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BundleError(f"CUDA call failed with error {err}")
    return values[0] if len(values) == 1 else (values or None)


RUNNERS = {"onnx": onnxruntime_runner, "openvino": openvino_runner, "tensorrt": tensorrt_runner}


# ---------------------------------------------------------------------------------------------------------------
# Checking a bundle against the PyTorch outputs it shipped with, and timing it.


def reference_check(bundle: Bundle) -> dict:
    """Run the bundle on the reference images stored at export and compare with the PyTorch student's scores."""
    path = bundle.root / "reference.npz"
    if not path.is_file():
        raise BundleError(f"Bundle {bundle.root} has no reference.npz to check against")
    ref = np.load(path)
    x = np.stack([normalize(p, bundle.spec) for p in ref["pixels"]])
    return compare_scores(ref["scores"], bundle.predict(x))


def compare_scores(ref: np.ndarray, out: np.ndarray) -> dict:
    """Top-1 agreement (fraction), per-sample cosine and max-abs error between two [N, K] score arrays."""
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    if ref.shape != out.shape:
        raise BundleError(f"Output shape {out.shape} differs from the reference {ref.shape}")
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    cosine = (ref * out).sum(1) / np.maximum(norms, 1e-12)
    return {"images": len(ref), "top1_agreement": float((ref.argmax(1) == out.argmax(1)).mean()),
            "cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
            "max_abs_error": float(np.abs(ref - out).max()), "mean_abs_error": float(np.abs(ref - out).mean())}


# ---------------------------------------------------------------------------------------------------------------
# Command line


def softmax(scores: np.ndarray) -> np.ndarray:
    e = np.exp(scores - scores.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def cmd_predict(args) -> int:
    bundle = load_bundle(args.bundle, threads=args.threads)
    scores = bundle.predict_images([load_image(p) for p in args.images])
    probs = softmax(scores)
    results = []
    for path, p in zip(args.images, probs):
        top = np.argsort(-p)[: args.top_k]
        results.append({"image": str(path), "top1": bundle.class_names[top[0]],
                        "top": [{"class": bundle.class_names[i], "probability": float(p[i])} for i in top]})
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(f"{r['image']}: " + ", ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top"]))
    return 0


def cmd_bench(args) -> int:
    bundle = load_bundle(args.bundle, threads=args.threads)
    rows = []
    for batch in [int(b) for b in args.batch.split(",")]:
        row = {"backend": bundle.manifest["runtime"]["name"], "precision": bundle.manifest["precision"],
               "batch": batch, **bench_bundle(bundle, batch, args.warmup, args.iters)}
        rows.append(row)
        print(f"{bundle.name} batch {batch}: p50 {row['p50_ms']:.2f} ms, p90 {row['p90_ms']:.2f} ms, "
              f"p99 {row['p99_ms']:.2f} ms, {row['throughput_ips']:.1f} images/s")
    if args.json:
        write_atomic(args.json, (json.dumps(rows, indent=2) + "\n").encode())
    return 0


def cmd_verify(args) -> int:
    bundle = load_bundle(args.bundle, threads=args.threads)
    result = {**reference_check(bundle), "host": cpu_profile()}
    export = bundle.manifest.get("parity", {}).get("reference_check")
    if export:  # INT8 rounding depends on the instruction set: say when this host disagrees with the export host
        result["export_host"] = {**export, "cpu": bundle.manifest.get("host", {}).get("cpu"),
                                 "isa": bundle.manifest.get("host", {}).get("isa")}
        result["same_as_export_host"] = result["top1_agreement"] == export["top1_agreement"]
        if not result["same_as_export_host"]:
            print(f"note: top-1 agreement here {result['top1_agreement']:.3f} differs from the export host's "
                  f"{export['top1_agreement']:.3f} ({result['export_host']['cpu']})", file=sys.stderr)
    print(json.dumps(result, indent=2))
    threshold = bundle.manifest.get("parity", {}).get("threshold", 0.0)
    return 0 if result["top1_agreement"] >= threshold else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run.py", description="Run an edgedistill bundle (numpy + pillow + one runtime).")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    pred = verbs.add_parser("predict", help="classify images")
    pred.add_argument("bundle")
    pred.add_argument("images", nargs="+")
    pred.add_argument("--top-k", type=int, default=3)
    pred.add_argument("--json", action="store_true", help="print JSON")
    pred.set_defaults(fn=cmd_predict)
    bench = verbs.add_parser("bench", help="latency and throughput on random inputs")
    bench.add_argument("bundle")
    bench.add_argument("--batch", default="1", help="comma list of batch sizes")
    bench.add_argument("--warmup", type=int, default=10)
    bench.add_argument("--iters", type=int, default=50)
    bench.add_argument("--json", default="", help="also write the rows to this file")
    bench.set_defaults(fn=cmd_bench)
    verify = verbs.add_parser("verify", help="compare with the PyTorch scores stored at export (reference.npz)")
    verify.add_argument("bundle")
    verify.set_defaults(fn=cmd_verify)
    for sub in (pred, bench, verify):
        sub.add_argument("--threads", type=int, default=0, help="CPU threads (0: runtime default)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (BundleError, ImportError, FileNotFoundError) as e:
        print(f"run.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
