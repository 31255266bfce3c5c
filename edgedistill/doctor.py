"""``edgedistill doctor``: what this machine can do — optional backends, the host's CPU and GPU, and which built-in
recipes run here offline (and, for the others, what they need)."""
import importlib.metadata
import importlib.util

from .host import ISA_FLAGS, host_profile

# (import name, distribution, extra that installs it, what it is for)
BACKENDS = (("open_clip", "open_clip_torch", "clip", "CLIP teachers"),
            ("diffusers", "diffusers", "synth", "Stable Diffusion generators"),
            ("transformers", "transformers", "synth", "generators' text encoders, local LLM prompts"),
            ("onnx", "onnx", "onnx", "ONNX export"),
            ("onnxruntime", "onnxruntime", "onnx", "ONNX Runtime bundles, runtime teacher"),
            ("openvino", "openvino", "openvino", "OpenVINO bundles, runtime teacher"),
            ("nncf", "nncf", "openvino", "OpenVINO INT8"),
            ("tensorrt", "tensorrt", "tensorrt", "TensorRT engines"),
            ("gradio", "gradio", "demo", "the demo"))
OFFLINE_TEACHERS = {"efficientnet-lite", "tiny-clip", "tiny-vit", "tiny-cnn"}
OFFLINE_DATASETS = {"imagefolder", "conformal-clip-data"}


def backend_status() -> list[dict]:
    rows = []
    for module, dist, extra, purpose in BACKENDS:
        present = importlib.util.find_spec(module) is not None
        try:
            version = importlib.metadata.version(dist) if present else ""
        except importlib.metadata.PackageNotFoundError:
            version = "?"
        rows.append({"backend": module, "present": present, "version": version, "for": purpose,
                     "install": "" if present else f"pip install 'edgedistill[{extra}]'"
                     + (" (or JetPack on a Jetson)" if module == "tensorrt" else "")})
    return rows


def recipe_needs(recipe) -> list[str]:
    """What a recipe needs beyond this package to run offline (empty: it runs anywhere, offline)."""
    needs = []
    if recipe.teacher.name not in OFFLINE_TEACHERS:
        needs.append(f"teacher weights {recipe.teacher.name} {recipe.teacher.arch} from a model hub")
    if recipe.student.pretrained:
        needs.append(f"student weights {recipe.student.name} from the timm hub")
    if recipe.data.dataset not in OFFLINE_DATASETS:
        needs.append(f"the {recipe.data.dataset} dataset (downloads on first use)")
    if recipe.synthetic is not None and not recipe.synthetic.generator.startswith("tiny"):
        needs.append(f"generator weights {recipe.synthetic.generator}")
    return needs


def recipe_status() -> list[dict]:
    from .checks import load_checked
    from .recipe import builtin_recipes

    rows = []
    for name in builtin_recipes():
        try:
            needs = recipe_needs(load_checked(name))
        except Exception as e:  # noqa: BLE001 - a recipe this machine cannot even load is reported, not raised
            needs = [f"does not load here: {str(e).splitlines()[0]}"]
        rows.append({"recipe": name, "offline": not needs, "needs": needs})
    return rows


def report() -> str:
    lines = ["Optional backends:"]
    for b in backend_status():
        state = f"present {b['version']}" if b["present"] else f"absent — {b['install']}"
        lines.append(f"  {b['backend']:<13} {state:<44} ({b['for']})")
    host = host_profile()
    lines += ["", "Host:", f"  cpu      {host['cpu']} ({host['machine']}), {host['cores']} cores, torch uses "
              f"{host['torch_threads']} threads",
              f"  isa      {', '.join(host['isa']) or 'none of ' + ', '.join(ISA_FLAGS.values())}",
              f"  gpu      {', '.join(host['gpus']) + ' (CUDA ' + host['cuda'] + ')' if host['gpus'] else 'none'}",
              f"  software python {host['python']}, torch {host['torch']}, {host['os']}", "", "Built-in recipes:"]
    for r in recipe_status():
        state = "runs here offline" if r["offline"] else "needs " + "; ".join(r["needs"])
        lines.append(f"  {r['recipe']:<15} {state}")
    return "\n".join(lines)
