"""The Gradio demo through its API (gradio_client on 127.0.0.1 only): right answers, bad input that gets a sentence
on the page while the server goes on serving, and the safe defaults.

The runs come from the real pipeline (`recipe run` on a tiny recipe), trained in seconds on CPU.
"""
import json
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio", reason="the demo needs gradio: pip install 'edgedistill[demo]'")
pytest.importorskip("gradio_client", reason="the demo tests talk to the server with gradio_client")

from conftest import make_image_folder, tiny_recipe, write_recipe  # noqa: E402

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ["NO_PROXY"] = "127.0.0.1,localhost"
STARTUP_LIMIT_S = 15  # the acceptance bound for `edgedistill demo D` to answer on localhost


# ---------------------------------------------------------------------------------------------------------------
# Runs, servers and a client


def demo_run(base: Path, name: str, zero_shot: bool = False) -> Path:
    """A finished run of a tiny recipe plus its ONNX bundle, built once per test session and reused from disk.

    ``zero_shot``: a CLIP-aligned student of the tiny random CLIP teacher; else a closed-set one of ``tiny-cnn``.
    """
    from edgedistill import cli

    run = base / name
    if (run / "metrics.json").is_file():
        return run
    images = base / "demo-images"
    if not images.is_dir():
        make_image_folder(images)
    train = {"epochs": 8 if not zero_shot else 2, "batch_size": 8, "lr": 0.01, "device": "cpu"}
    recipe = tiny_recipe(images, baseline=False, train=train)
    if zero_shot:
        recipe.update(loss={"feature_l2": 1.0}, eval={"zero_shot": True})
        recipe["teacher"] = {"name": "tiny-clip", "head": "zeroshot", "templates": ["a photo of {c}."]}
    assert cli.main(["recipe", "run", str(write_recipe(base / f"{name}.yaml", recipe)), "--out", str(run)]) == 0
    if has_onnx():
        from edgedistill.export import export_run

        export_run(run, formats=["onnx"], precisions=["fp32"])
    return run


def has_onnx() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))


def closed_run_dir(tmp_path_factory) -> Path:
    return demo_run(tmp_path_factory.getbasetemp(), "demo-closed")


@pytest.fixture(scope="session")
def closed_run(tmp_path_factory):
    return closed_run_dir(tmp_path_factory)


@pytest.fixture(scope="session")
def zs_run(tmp_path_factory):
    pytest.importorskip("open_clip", reason="the zero-shot demo needs open_clip: pip install 'edgedistill[clip]'")
    return demo_run(tmp_path_factory.getbasetemp(), "demo-zeroshot", zero_shot=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_page(url: str, proc, limit_s: float) -> float:
    """Seconds until ``url`` answers 200, or fail with the server's output."""
    import httpx

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 120:
        if proc.poll() is not None:
            pytest.fail(f"`edgedistill demo` exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            time.sleep(0.1)
    pytest.fail(f"`edgedistill demo` did not answer on {url} within 120 s")


def start_cli(path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "edgedistill", "demo", str(path), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        return proc.communicate(timeout=20)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[0]


@pytest.fixture(scope="module")
def cli_server(closed_run):
    """`edgedistill demo RUN` exactly as a user starts it: (url, seconds until the page answered, process)."""
    port = free_port()
    proc = start_cli(closed_run, port)
    url = f"http://127.0.0.1:{port}/"
    seconds = wait_for_page(url, proc, STARTUP_LIMIT_S)
    yield url, seconds, proc
    stop(proc)


@pytest.fixture(scope="module")
def client(cli_server):
    from gradio_client import Client

    return Client(cli_server[0], verbose=False, analytics_enabled=False)


def ask(client, image, backend="PyTorch", classes=None, k=3, run=None) -> dict:
    """One request through the public /predict endpoint: the details dict plus the page's summary text."""
    from gradio_client import handle_file

    if classes is None:
        classes = "\n".join(read_classes(run))
    student, teacher, summary, details = client.predict(handle_file(str(image)), backend, classes, k,
                                                        api_name="/predict")
    return {**details, "summary": summary, "student_label": student, "teacher_label": teacher}


def read_classes(run) -> list:
    import json

    return json.loads((Path(run) / "split.json").read_text())["classes"]


def held_out_images(run) -> dict:
    """One held-out test image per class: {class: path}."""
    import json

    split = json.loads((Path(run) / "split.json").read_text())
    out = {}
    for path, label in split["test"]:
        out.setdefault(split["classes"][label], path)
    return out


@pytest.fixture(scope="module")
def images(closed_run):
    return held_out_images(closed_run)


# ---------------------------------------------------------------------------------------------------------------
# Acceptance: the CLI answers quickly, on localhost only, and gets the class right


def test_cli_demo_answers_quickly_on_localhost_only(cli_server):
    url, seconds, _ = cli_server
    assert seconds < STARTUP_LIMIT_S, f"`edgedistill demo` took {seconds:.1f} s to answer"
    with socket.socket() as s:  # bound to 127.0.0.1, so another loopback address is refused
        s.settimeout(2)
        assert s.connect_ex(("127.0.0.2", int(url.rsplit(":", 1)[1].strip("/")))) != 0


def test_sample_image_gets_the_right_class_on_every_backend(client, closed_run, images):
    backends = ["PyTorch"] + (["ONNX fp32"] if (closed_run / "export" / "onnx-fp32").is_dir() else [])
    for backend in backends:
        for cls, path in images.items():
            r = ask(client, path, backend, run=closed_run)
            assert r["ok"], r["message"]
            assert r["student"]["top1"] == cls, (backend, r["summary"])
            assert r["student_label"]["label"] == cls
            assert r["student"]["latency_ms"]["total"] > 0 and "ms" in r["summary"]
            # the teacher's answer beside the student's, with their agreement
            assert r["teacher"]["top1"] == cls and r["agree"] is True and "agree" in r["summary"]


def test_top_k_limits_the_classes_shown(client, closed_run, images):
    r = ask(client, images["red"], k=2, run=closed_run)
    assert len(r["student"]["top"]) == 2 and len(r["student_label"]["confidences"]) == 2


# ---------------------------------------------------------------------------------------------------------------
# Bad input: a message on the page, and the server goes on serving


def test_text_file_as_image_gets_a_message_and_server_goes_on(client, closed_run, images, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("this is not an image\n" * 20)
    r = ask(client, text, run=closed_run)
    assert not r["ok"] and "not an image" in r["summary"] and not r["student_label"]
    assert ask(client, images["green"], run=closed_run)["student"]["top1"] == "green"


def png_claiming_size(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims ``width`` x ``height``: a decompression bomb that costs nothing to send."""
    Image.new("RGB", (8, 8), "red").save(path)
    data = bytearray(path.read_bytes())
    ihdr = 8  # after the PNG signature: length, b"IHDR", then width and height
    data[ihdr + 8:ihdr + 16] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr + 4:ihdr + 8 + 13]))
    data[ihdr + 8 + 13:ihdr + 8 + 17] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("case, expected", [
    ("truncated.png", "damaged or truncated"),
    ("truncated.jpg", "damaged or truncated"),
    ("huge.png", "megapixels"),
    ("bomb.png", "too large"),
    ("empty.png", "not an image"),
])
def test_bad_images_get_a_message(client, closed_run, images, tmp_path, case, expected):
    path = tmp_path / case
    good = Image.open(images["blue"]).convert("RGB").resize((64, 64))
    if case == "truncated.png":
        good.save(path)
        path.write_bytes(path.read_bytes()[:-40])
    elif case == "truncated.jpg":
        good.save(path, quality=95)
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    elif case == "huge.png":
        png_claiming_size(path, 8000, 6000)  # 48 MP: over the demo's cap, under Pillow's bomb limit
    elif case == "bomb.png":
        png_claiming_size(path, 50_000, 50_000)
    else:
        path.write_bytes(b"")
    r = ask(client, path, run=closed_run)
    assert not r["ok"] and expected in r["summary"], r["summary"]
    assert ask(client, images["blue"], run=closed_run)["student"]["top1"] == "blue"


def unusual_mode(img: Image.Image, mode: str, path: Path) -> Path:
    if mode == "L":
        img.convert("L").save(path)
    elif mode == "RGBA":
        img.convert("RGBA").save(path)
    elif mode == "CMYK":
        img.convert("CMYK").save(path)  # TIFF keeps CMYK losslessly
    elif mode == "I;16":
        arr = np.asarray(img.convert("L"), dtype=np.uint16) * 257
        Image.fromarray(arr).save(path)  # a 16-bit grayscale PNG
    elif mode == "P":
        img.convert("P", palette=Image.ADAPTIVE).save(path)
    return path


@pytest.mark.parametrize("mode, suffix, keeps_colour", [
    ("L", "png", False), ("RGBA", "png", True), ("CMYK", "tiff", True), ("I;16", "png", False), ("P", "png", True),
])
def test_grayscale_rgba_cmyk_16bit_images_are_classified(client, closed_run, images, tmp_path, mode, suffix,
                                                          keeps_colour):
    img = Image.open(images["red"])
    path = unusual_mode(img, mode, tmp_path / f"img.{suffix}")
    assert Image.open(path).mode.startswith(mode[0])
    r = ask(client, path, run=closed_run)
    assert r["ok"], r["summary"]
    if keeps_colour:  # the same pixels in another mode get the same answer
        assert r["student"]["top1"] == "red"


@pytest.mark.parametrize("classes, expected", [
    ("", "empty"),
    ("  \n , \n", "empty"),
    ("red\ngreen\nred", "twice"),
    ("red, Red, blue", "twice"),
])
def test_empty_or_duplicated_class_list_gets_a_message(client, closed_run, images, classes, expected):
    r = ask(client, images["red"], classes=classes)
    assert not r["ok"] and expected in r["summary"]


def test_closed_set_student_shows_its_own_classes(client, closed_run, images):
    r = ask(client, images["red"], classes="cat\ndog")
    assert r["ok"] and r["classes"] == read_classes(closed_run)
    assert "closed-set" in r["summary"]


# ---------------------------------------------------------------------------------------------------------------
# Safe by default


def call_raw(url: str, data: list) -> str:
    """The HTTP API without gradio_client (which would upload a local file itself): the event stream's text."""
    import httpx

    api = url.rstrip("/") + "/gradio_api/call/predict"
    event = httpx.post(api, json={"data": data}, timeout=30).json()["event_id"]
    return httpx.get(f"{api}/{event}", timeout=60).text


def test_server_reads_no_path_a_visitor_names(cli_server, client, closed_run, images):
    import httpx

    url = cli_server[0].rstrip("/")
    for path in (str(Path(closed_run) / "recipe.yaml"), images["red"], "/etc/passwd"):
        stream = call_raw(url, [{"path": path, "meta": {"_type": "gradio.FileData"}}, "PyTorch", "red", 3])
        assert "event: error" in stream and "not uploaded" in stream, stream
        assert httpx.get(f"{url}/gradio_api/file={path}", timeout=10).status_code == 403
    assert ask(client, images["red"], run=closed_run)["ok"]


def test_upload_size_is_capped(cli_server, tmp_path):
    import httpx
    from edgedistill.demo.inputs import MAX_UPLOAD

    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + os.urandom(int(MAX_UPLOAD.rstrip("mb")) * 1024 * 1024 + 1024))
    with big.open("rb") as f:
        r = httpx.post(cli_server[0].rstrip("/") + "/gradio_api/upload", files={"files": f}, timeout=60)
    assert r.status_code == 413, r.text


def test_defaults_are_localhost_without_share_link(cli_server):
    import inspect

    import httpx
    from edgedistill.demo.app import launch

    from edgedistill.cli import build_parser

    args = build_parser().parse_args(["demo", "RUN"])
    assert (args.host, args.share) == ("127.0.0.1", False)
    defaults = {k: v.default for k, v in inspect.signature(launch).parameters.items()}
    assert (defaults["host"], defaults["share"]) == ("127.0.0.1", False)
    config = httpx.get(cli_server[0].rstrip("/") + "/config", timeout=10).json()
    assert not config["analytics_enabled"] and not config["run_history"] and not config["mcp_server"]


# ---------------------------------------------------------------------------------------------------------------
# Zero-shot and bundles, on servers started in this process


@pytest.fixture
def serve():
    from edgedistill.demo.app import serve as serve_models
    from edgedistill.demo.models import DemoModels

    started = []

    def start(path, patch=None):
        from gradio_client import Client

        models = DemoModels(path)
        if patch:
            patch(models)
        port = free_port()
        started.append(serve_models(models, port=port, block=False))
        return Client(f"http://127.0.0.1:{port}/", verbose=False, analytics_enabled=False), models

    yield start
    for demo in started:
        demo.close()


def test_zero_shot_student_takes_new_class_names(serve, zs_run):
    client, _ = serve(zs_run)
    image = held_out_images(zs_run)["green"]
    r = ask(client, image, classes="a ripe tomato\na lime\nthe sea\na lump of coal")
    assert r["ok"], r["summary"]
    assert r["classes"] == ["a ripe tomato", "a lime", "the sea", "a lump of coal"]
    assert set(r["student"]["top"]) <= set(r["classes"]) and set(r["teacher"]["top"]) <= set(r["classes"])
    assert not r["notes"]


def test_zero_shot_without_text_encoder_uses_precomputed_classes(serve, zs_run):
    from edgedistill.demo.models import Lazy

    from edgedistill.teachers import WeightsUnavailable

    def offline_teacher(models):
        def fail():
            raise WeightsUnavailable("Teacher 'clip' needs the open_clip weights ViT-B-32: offline and not cached")
        models.teacher = Lazy(fail)

    client, _ = serve(zs_run, offline_teacher)
    r = ask(client, held_out_images(zs_run)["blue"], classes="cat\ndog")
    assert r["ok"] and r["classes"] == read_classes(zs_run) and "teacher" not in r
    assert "precomputed" in r["summary"] and "not available" in r["summary"]


def test_a_failing_backend_or_teacher_never_shows_its_exception_text(serve, closed_run, images):
    # What an exception says (paths, hosts, internals) stays in the server log; the visitor gets the kind of failure.
    from edgedistill.demo.models import Lazy

    secret = "/srv/private/model-store token=abc123"

    def broken(models):
        def fail():
            raise RuntimeError(secret)
        for choice in models.backends.values():
            choice.lazy = Lazy(fail)
        models.teacher = Lazy(fail)

    client, _ = serve(closed_run, broken)
    r = ask(client, images["red"], run=closed_run)
    assert not r["ok"] and "cannot run here" in r["message"] and "server log" in r["message"]
    assert secret not in json.dumps(r)


def test_bundle_alone_serves_its_own_backend(serve, closed_run, images):
    bundle = closed_run / "export" / "onnx-fp32"
    if not bundle.is_dir():
        pytest.skip("needs an ONNX bundle: pip install 'edgedistill[onnx]'")
    client, models = serve(bundle)
    assert models.usable_backends == ["ONNX fp32"] and models.teacher is None
    r = ask(client, images["green"], backend="ONNX fp32", run=closed_run)
    assert r["ok"] and r["student"]["top1"] == "green" and "teacher" not in r


def test_zero_shot_bundle_says_its_classes_are_precomputed(serve, zs_run):
    if not (zs_run / "export" / "onnx-fp32").is_dir():
        pytest.skip("needs an ONNX bundle: pip install 'edgedistill[onnx]'")
    client, _ = serve(zs_run)
    r = ask(client, held_out_images(zs_run)["red"], backend="ONNX fp32", classes="cat\ndog")
    assert r["ok"] and r["classes"] == read_classes(zs_run) and "precomputed" in r["summary"]


def test_unknown_folder_is_refused_before_serving(tmp_path):
    from edgedistill import cli

    assert cli.main(["demo", str(tmp_path)]) == 2


def test_bundle_that_failed_parity_is_not_offered(closed_run, tmp_path):
    """A bundle the export marked as disagreeing with the student is listed as unavailable, with the reason."""
    import json
    import shutil

    from edgedistill.demo.models import DemoModels

    if not has_onnx():
        pytest.skip("needs onnx and onnxruntime (pip install 'edgedistill[onnx]')")
    run = tmp_path / "run"
    shutil.copytree(closed_run, run)
    manifest_file = run / "export" / "onnx-fp32" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["parity"].update(passed=False, top1_agreement=0.5)
    manifest_file.write_text(json.dumps(manifest))
    models = DemoModels(run)
    assert models.usable_backends == ["PyTorch"]
    (reason,) = [b.unavailable for b in models.backends.values() if b.unavailable]
    assert "failed its parity check" in reason and "0.500" in reason
