"""``edgedistill push``: the Hub layout written with ``--to-dir``, and each reason an upload cannot happen as one line.

No test reaches the network: uploads go to ``--to-dir`` or to a stand-in for ``HfApi``.
"""
import json
import shutil
from pathlib import Path

import pytest

from edgedistill.cli import main
from edgedistill.runtime.run import load_bundle

from test_card import exported_run, split_card  # noqa: F401  (a session fixture: one tiny exported run)
from test_cli import fails


def tree(folder: Path) -> set:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_a_run_folder_is_laid_out_as_on_the_hub(exported_run, tmp_path):
    dest = tmp_path / "repo"
    assert main(["push", str(exported_run), "me/tiny-student", "--to-dir", str(dest)]) == 0
    bundle = json.loads((exported_run / "export" / "onnx-fp32" / "manifest.json").read_text())
    expected = {"README.md", "recipe.yaml", "metrics.json", "report.md", "bench.json", "bench.md", "bench.png",
                "confusion-teacher.png", "confusion-student.png", "confusion-baseline.png", "student/model.pt",
                "export/onnx-fp32/README.md", "export/onnx-fp32/manifest.json",
                *(f"export/onnx-fp32/{name}" for name in bundle["files"])}
    assert tree(dest) == expected  # no split.json (local paths), caches, checkpoints or baseline
    assert (dest / "student" / "model.pt").read_bytes() == (exported_run / "student" / "model.pt").read_bytes()
    meta, body = split_card((dest / "README.md").read_text())
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == json.loads(
        (exported_run / "metrics.json").read_text())["student"]["top1"]
    assert (dest / "README.md").read_text() == (exported_run / "README.md").read_text()


def test_a_bundle_is_laid_out_as_on_the_hub_and_still_loads(exported_run, tmp_path):
    source, dest = exported_run / "export" / "onnx-fp32", tmp_path / "repo"
    assert main(["push", str(source), "me/tiny-onnx", "--to-dir", str(dest)]) == 0
    manifest = json.loads((source / "manifest.json").read_text())
    assert tree(dest) == {"README.md", "manifest.json", *manifest["files"]}
    assert split_card((dest / "README.md").read_text())[0]["tags"][-2:] == ["onnx", "fp32"]
    load_bundle(dest)  # every file's sha256 still matches the manifest


def test_a_tampered_bundle_is_refused(exported_run, tmp_path, capsys):
    bundle = tmp_path / "onnx-fp32"
    shutil.copytree(exported_run / "export" / "onnx-fp32", bundle)
    with open(bundle / "model.onnx", "ab") as f:
        f.write(b"\0")
    line = fails(capsys, "push", bundle, "me/x", "--to-dir", tmp_path / "repo")
    assert "model.onnx changed after export" in line and not (tmp_path / "repo").exists()


def test_push_refuses_a_folder_that_is_neither_and_a_busy_to_dir(exported_run, tmp_path, capsys):
    assert "neither a bundle" in fails(capsys, "push", tmp_path, "me/x", "--to-dir", tmp_path / "repo")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert "not an empty folder" in fails(capsys, "push", exported_run, "me/x", "--to-dir", busy)
    assert tree(busy) == {"keep.txt"}
    assert "owner/name" in fails(capsys, "push", exported_run, "no-owner", "--to-dir", tmp_path / "repo")


@pytest.fixture
def online(monkeypatch):
    """huggingface_hub as if online, with a token; ``HfApi`` replaced by whatever the test sets."""
    hf = pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf, "get_token", lambda: "hf_test_token")
    return lambda api: monkeypatch.setattr(hf, "HfApi", lambda: api)


def test_offline_mode_is_one_line(exported_run, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert "HF_HUB_OFFLINE is set" in fails(capsys, "push", exported_run, "me/x")


def test_a_missing_token_is_one_line(exported_run, capsys, online, monkeypatch):
    import huggingface_hub as hf

    monkeypatch.setattr(hf, "get_token", lambda: None)
    assert "no Hugging Face token" in fails(capsys, "push", exported_run, "me/x")


class FakeApi:
    """Records what would be uploaded; ``fail`` makes ``create_repo`` raise it, as an unreachable Hub does."""

    def __init__(self, fail=None):
        self.fail, self.calls = fail, []

    def create_repo(self, repo_id, **kwargs):
        if self.fail:
            raise self.fail
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        self.calls.append(("upload_folder", repo_id, tree(Path(folder_path))))


def test_an_unreachable_hub_is_one_line(exported_run, capsys, online):
    online(FakeApi(fail=ConnectionError("[Errno 111] Connection refused")))
    line = fails(capsys, "push", exported_run, "me/x")
    assert "could not upload to me/x: ConnectionError: [Errno 111] Connection refused" in line


def test_upload_creates_the_repo_and_uploads_the_layout(exported_run, tmp_path, capsys, online):
    api = FakeApi()
    online(api)
    assert main(["push", str(exported_run / "export" / "onnx-fp32"), "me/tiny-onnx", "--private"]) == 0
    assert capsys.readouterr().out.strip() == "https://huggingface.co/me/tiny-onnx"
    (_, repo, kwargs), (_, repo2, files) = api.calls
    assert repo == repo2 == "me/tiny-onnx" and kwargs["private"] is True and kwargs["exist_ok"] is True
    assert main(["push", str(exported_run / "export" / "onnx-fp32"), "me/y", "--to-dir", str(tmp_path / "d")]) == 0
    assert files == tree(tmp_path / "d")  # the upload is exactly what --to-dir writes
