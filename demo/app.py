"""The Gradio page: upload an image, see the student's top-k classes beside the teacher's, with latencies.

    edgedistill demo RUN_DIR_OR_BUNDLE [--host 127.0.0.1] [--port 7860] [--share]

Safe by default: it listens on 127.0.0.1, asks for no share link, caps uploads at ``MAX_UPLOAD``, and reads only
files a visitor uploaded (plus the examples it copies from the run at start). Whatever a visitor sends, the page
answers with a result or a sentence saying what was wrong, and the server goes on serving.
"""
import logging
import os
import tempfile
import time
from pathlib import Path

import gradio as gr
import numpy as np

from .inputs import MAX_UPLOAD, InputError, parse_class_names, read_image, upload_path
from .models import PYTORCH, DemoModels

log = logging.getLogger(__name__)

MAX_EXAMPLES = 8
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
# System fonts only: the page must render on an offline edge box without reaching Google Fonts.
THEME = {"font": ["ui-sans-serif", "system-ui", "sans-serif"], "font_mono": ["ui-monospace", "monospace"]}
CSS = ".summary p { margin: 0.2em 0; }"
PLACEHOLDER = "Upload an image or pick an example."


class BackendUnavailable(RuntimeError):
    """The chosen backend cannot run here (missing runtime, no GPU, weights absent)."""


def launch(path, host: str = "127.0.0.1", port: int = 7860, share: bool = False, block: bool = True):
    """Serve the demo for a run folder or a bundle folder; with ``block=False`` return the running Blocks."""
    return serve(DemoModels(path), host, port, share, block)


def serve(models: DemoModels, host: str = "127.0.0.1", port: int = 7860, share: bool = False, block: bool = True):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from an offline box
    demo = build_demo(models)
    demo.queue(default_concurrency_limit=1)
    # No run history (it offers to upload runs to a Hugging Face bucket), no MCP server, no server-side rendering.
    demo.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_UPLOAD, show_error=True,
                ssr_mode=False, mcp_server=False, run_history=False, footer_links=["api"], prevent_thread_lock=True,
                quiet=not block, theme=gr.themes.Default(**THEME), css=CSS)
    models.warm_up()  # after the server is up: the page answers while torch and the models load
    if block:
        demo.block_thread()
    return demo


# ---------------------------------------------------------------------------------------------------------------
# Classifying one request


def classify(models: DemoModels, payload, backend, class_text, k) -> dict:
    """Everything the page shows for one request, as plain data (also the API's ``details`` output)."""
    t0 = time.perf_counter()
    try:
        img = read_image(upload_path(payload, gr.utils.get_upload_folder()))
        names = parse_class_names(class_text)
        result = {"ok": True, "message": "", **answer(models, img, str(backend), names, clamp_k(k, models))}
    except (InputError, BackendUnavailable) as e:
        result = {"ok": False, "message": str(e)}
    except Exception as e:  # a bug must cost one request, not the server
        ref = log_failure("demo request failed", e)
        result = {"ok": False, "message": f"Something went wrong while classifying this image (reference {ref} in "
                                          "the server log)."}
    result["request_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
    return result


def log_failure(what: str, e: Exception) -> str:
    """Log ``e`` with its traceback for the operator; return a short reference the visitor can quote."""
    ref = f"{time.time_ns() % 0xFFFFFF:06x}"
    log.error("%s [ref %s]", what, ref, exc_info=e)
    return ref


def why_unavailable(e: Exception, what: str) -> str:
    """A visitor-safe reason: the kind of failure, never the exception's text (paths, hosts, internals)."""
    from edgedistill.teachers import WeightsUnavailable

    ref = log_failure(f"{what} unavailable", e)
    if isinstance(e, WeightsUnavailable):
        return "its weights are not on this server"
    if isinstance(e, ImportError):
        return "its runtime is not installed on this server"
    return f"it failed to load (reference {ref} in the server log)"


def clamp_k(k, models: DemoModels) -> int:
    try:
        return max(1, min(int(float(k)), 50))
    except (TypeError, ValueError):
        return min(5, len(models.class_names))


def answer(models: DemoModels, img, backend: str, typed: list, k: int) -> dict:
    # 1. The classes: the typed ones when the student can take them, else its own, saying why.
    notes = []
    names, text = resolve_classes(models, backend, typed, notes)
    # 2. The student on the chosen backend.
    student = load_backend(models, backend).scores(img, names, text)
    out = {"backend": backend, "classes": names, "student": describe(student, k), "notes": notes}
    # 3. The teacher beside it, when the run has one that loads.
    teacher = teacher_answer(models, img, names, text, notes)
    if teacher is not None:
        out["teacher"] = describe(teacher, k)
        out["agree"] = teacher.top1 == student.top1
    return out


def describe(a, k: int) -> dict:
    return {"top1": a.top1, "top": a.top(k), "latency_ms": {"total": round(a.prep_ms + a.model_ms, 2),
            "model": round(a.model_ms, 2), "preprocess": round(a.prep_ms, 2)}}


def load_backend(models: DemoModels, backend: str):
    choice = models.backends.get(backend)
    if choice is None:
        raise InputError(f"Unknown backend {backend!r}; this demo has {models.usable_backends}.")
    if choice.unavailable:
        raise BackendUnavailable(f"The {backend} backend cannot run here: it {choice.unavailable}.")
    try:
        return choice.lazy.get()
    except Exception as e:
        raise BackendUnavailable(f"The {backend} backend cannot run here: {why_unavailable(e, backend)}.") from e


def resolve_classes(models: DemoModels, backend: str, typed: list, notes: list):
    """(names, text embeddings or None): new names are embedded by the teacher's text encoder when possible."""
    own = models.class_names
    if typed == own:
        return own, None
    if not models.zero_shot:
        notes.append(f"This student is closed-set: it knows only its own {len(own)} classes, shown here; the typed "
                     "class names were not used.")
        return own, None
    if backend != PYTORCH:
        notes.append(f"The {backend} bundle carries the {len(own)} classes precomputed at export, used here; new "
                     "class names need the PyTorch student and the teacher's text encoder.")
        return own, None
    try:
        teacher = models.teacher.get()
    except Exception as e:
        notes.append(f"The teacher's text encoder is not available ({why_unavailable(e, 'teacher')}), so the "
                     f"{len(own)} classes precomputed at training are used instead of the typed ones.")
        return own, None
    if not teacher.embeds_text:
        notes.append(f"The teacher {teacher.name!r} has no text encoder, so the {len(own)} classes precomputed at "
                     "training are used instead of the typed ones.")
        return own, None
    return typed, teacher.text_embeddings(typed).astype(np.float32)


def teacher_answer(models: DemoModels, img, names, text, notes: list):
    if models.teacher is None:
        return None
    try:
        teacher = models.teacher.get()
    except Exception as e:
        notes.append(f"The teacher is not shown: {why_unavailable(e, 'teacher')}.")
        return None
    return teacher.scores(img, names, text)


# ---------------------------------------------------------------------------------------------------------------
# What the page shows


def page_outputs(models: DemoModels, result: dict) -> tuple:
    """(student label, teacher label, summary markdown, details) for one result."""
    if not result["ok"]:
        return None, None, f"**Not classified.** {result['message']}", result
    teacher = result.get("teacher")
    return result["student"]["top"], teacher["top"] if teacher else None, summary_markdown(models, result), result


def summary_markdown(models: DemoModels, r: dict) -> str:
    s = r["student"]
    lines = [(f"**Student** ({r['backend']}): **{s['top1']}** {100 * s['top'][s['top1']]:.1f}% · "
              f"{latency_text(s['latency_ms'])}")]
    if "teacher" in r:
        t = r["teacher"]
        lines.append(f"**Teacher** ({models.teacher_name}): **{t['top1']}** {100 * t['top'][t['top1']]:.1f}% · "
                     f"{latency_text(t['latency_ms'])}")
        lines.append((f"**Agreement:** yes, both say **{s['top1']}**." if r["agree"] else
                      f"**Agreement:** no, the student says **{s['top1']}**, the teacher **{t['top1']}**.")
                     + test_agreement(models))
    lines.append(f"Request: {r['request_ms']:.0f} ms in all.")
    lines += [f"*Note:* {note}" for note in r["notes"]]
    return "\n\n".join(lines)


def latency_text(ms: dict) -> str:
    return f"{ms['total']:.1f} ms ({ms['model']:.1f} model + {ms['preprocess']:.1f} preprocessing)"


def test_agreement(models: DemoModels) -> str:
    value = models.metrics.get("student", {}).get("agreement_with_teacher")
    return f" On the run's test images they agree on {value:.0f}%." if value is not None else ""


def header_markdown(models: DemoModels) -> str:
    kind = ("CLIP-aligned (zero-shot): type new class names" if models.zero_shot and not models.is_bundle else
            "CLIP-aligned, classes precomputed in the bundle" if models.zero_shot else "closed-set")
    teacher = f", distilled from teacher `{models.teacher_name}`" if models.teacher_name else ""
    lines = [f"# edgedistill demo · {models.name}",
             f"Student `{models.student_name}`{teacher} · {len(models.class_names)} classes · {kind}."]
    m = models.metrics
    if "student" in m and "teacher" in m:
        n = f" on the {m['n_test']} images of its held-out test split" if m.get("n_test") else \
            " on its held-out test split"
        lines.append(f"Top-1{n}: student {m['student']['top1']:.1f}%, teacher {m['teacher']['top1']:.1f}%.")
    if models.is_bundle:
        lines.append("Started on an exported bundle: the student runs alone, without its teacher.")
    missing = [f"{label} ({b.unavailable})" for label, b in models.backends.items() if b.unavailable]
    if missing:
        lines.append("Not available here: " + "; ".join(missing) + ".")
    return "\n\n".join(lines)


def class_box_info(models: DemoModels) -> str:
    if models.zero_shot and not models.is_bundle:
        return ("One per line (or comma-separated). New names are embedded with the teacher's text encoder when it is "
                "available; otherwise the classes precomputed at training are used and the result says so.")
    if models.zero_shot:
        return "Precomputed in the bundle: a bundle carries no text encoder, so these classes are fixed."
    return "Closed-set student: these are the classes it was trained on."


def examples(models: DemoModels) -> tuple[list, str]:
    """Up to MAX_EXAMPLES images, round-robin over classes, from the run's test split (else a bundle's reference),
    and a title for them."""
    from edgedistill.utils import read_json

    split = models.path / "split.json"
    if split.is_file():
        data = read_json(split)
        by_class = {}
        for path, label in data.get("test", []) + data.get("val", []):
            if Path(path).suffix.lower() in IMAGE_SUFFIXES and Path(path).is_file():
                by_class.setdefault(label, []).append(path)
        picked = []
        for rank in range(MAX_EXAMPLES):
            picked += [(paths[rank], data["classes"][label]) for label, paths in sorted(by_class.items())
                       if rank < len(paths)]
            if len(picked) >= MAX_EXAMPLES or all(rank >= len(p) for p in by_class.values()):
                break
        if picked:
            names = ", ".join(dict.fromkeys(c for _, c in picked[:MAX_EXAMPLES]))
            return [[p] for p, _ in picked[:MAX_EXAMPLES]], f"Examples: held-out images of {names}"
    return reference_examples(models)


def reference_examples(models: DemoModels) -> tuple[list, str]:
    """A bundle's reference.npz images (already cropped and resized), written as PNGs for the examples."""
    from PIL import Image

    refs = [models.path / "reference.npz"] + sorted(models.path.glob("export/*/reference.npz"))
    ref = next((p for p in refs if p.is_file()), None)
    if ref is None:
        return [], ""
    folder = Path(tempfile.mkdtemp(prefix="edgedistill-demo-"))
    files = []
    for i, pixels in enumerate(np.load(ref)["pixels"][:MAX_EXAMPLES]):
        Image.fromarray(pixels).save(folder / f"reference-{i}.png")
        files.append([str(folder / f"reference-{i}.png")])
    return files, "Examples: the bundle's reference images (already cropped and resized)"


def build_demo(models: DemoModels) -> gr.Blocks:
    backends = models.usable_backends
    k_max = min(max(10, len(models.class_names)), 50)
    with gr.Blocks(title=f"edgedistill · {models.name}", analytics_enabled=False) as demo:
        gr.Markdown(header_markdown(models))
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(label="Image", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                 height=300, elem_id="image")
                backend = gr.Radio(backends, value=backends[0] if backends else None, label="Backend",
                                   elem_id="backend")
                classes = gr.Textbox("\n".join(models.class_names), label="Class names",
                                     info=class_box_info(models), lines=min(len(models.class_names), 6), max_lines=12,
                                     interactive=models.zero_shot and not models.is_bundle, elem_id="classes")
                top_k = gr.Slider(1, k_max, value=min(5, len(models.class_names)), step=1, label="Top-k")
                run = gr.Button("Classify", variant="primary", elem_id="classify")
            with gr.Column(scale=1):
                student = gr.Label(label="Student", num_top_classes=k_max, elem_id="student")
                teacher = gr.Label(label="Teacher", num_top_classes=k_max, elem_id="teacher",
                                   visible=models.teacher is not None)
                summary = gr.Markdown(PLACEHOLDER, elem_id="summary",
                                      elem_classes="summary")
                with gr.Accordion("Details (JSON)", open=False):
                    details = gr.JSON(label="details", elem_id="details")
        files, title = examples(models)
        if files:
            gr.Examples(files, inputs=[image], label=title, examples_per_page=MAX_EXAMPLES)

        def predict(payload, backend_label, class_text, k):
            return page_outputs(models, classify(models, payload, backend_label, class_text, k))

        inputs, outputs = [image, backend, classes, top_k], [student, teacher, summary, details]
        # preprocess=False: the app opens the upload itself, so a file that is not an image gets a sentence, not a
        # stack trace. One queue for every trigger: the models run one request at a time. Only the button is API.
        queue = {"preprocess": False, "concurrency_id": "classify", "concurrency_limit": 1}
        run.click(predict, inputs, outputs, api_name="predict", **queue)
        for trigger in (image.change, backend.change, top_k.release):
            trigger(predict, inputs, outputs, api_visibility="private", trigger_mode="always_last", **queue)
    return demo
