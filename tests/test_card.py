"""Model cards: the README.md of a tiny exported run and of its bundle, parsed back as a Hub model card."""
import json
import re
from pathlib import Path

import pytest
import yaml

from edgedistill.card import CardSources, render_card
from edgedistill.cli import main

from conftest import tiny_recipe, write_recipe


@pytest.fixture(scope="session")
def exported_run(tmp_path_factory, image_folder):
    """A tiny run through ``recipe run``, exported to onnx-fp32 and benchmarked (about 15 s on 2 CPU cores)."""
    pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'edgedistill[onnx]')")
    folder = tmp_path_factory.mktemp("card")
    recipe = tiny_recipe(image_folder, export={"formats": ["onnx"], "precision": ["fp32"]},
                         bench={"batch": [1], "warmup": 1, "iters": 3, "backends": ["pytorch", "onnxruntime"]})
    assert main(["recipe", "run", str(write_recipe(folder / "tiny.yaml", recipe)), "--out", str(folder / "run")]) == 0
    return folder / "run"


def split_card(text: str) -> tuple[dict, str]:
    """The YAML header (between the first two ``---`` lines) and the Markdown body."""
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


def table_rows(body: str, section: str) -> dict:
    """First-column -> cells of the Markdown table under ``## section``."""
    part = body.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in part.splitlines() if line.startswith("| ")]
    return {r[0]: r[1:] for r in rows[1:]}


def test_bundle_card_header_and_accuracy_match_the_run_files(exported_run):
    bundle = exported_run / "export" / "onnx-fp32"
    metrics = json.loads((exported_run / "metrics.json").read_text())
    manifest = json.loads((bundle / "manifest.json").read_text())
    meta, body = split_card((bundle / "README.md").read_text())
    # 1. The header: the Hub's metadata fields, with the run's values.
    assert meta["license"] == "unknown"  # the tiny teacher's weights are random: no licence to inherit
    assert meta["library_name"] == "edgedistill" and meta["pipeline_tag"] == "image-classification"
    assert {"edgedistill", "knowledge-distillation", "onnx", "fp32", "test_efficientnet"} <= set(meta["tags"])
    root = yaml.safe_load((exported_run / "recipe.yaml").read_text())["data"]["root"]
    assert meta["datasets"] == [f"imagefolder:{Path(root).name}"]
    assert meta["metrics"] == ["accuracy", "f1"]
    (result,) = meta["model-index"][0]["results"]
    assert result["task"]["type"] == "image-classification" and result["dataset"]["split"] == "test"
    values = {m["name"]: m["value"] for m in result["metrics"]}
    student = metrics["student"]
    assert values["Top-1 accuracy (%)"] == student["top1"]
    assert values["Balanced accuracy (%)"] == student["balanced_accuracy"]
    assert values["Macro-F1 (%)"] == student["macro_f1"]
    bundle_top1 = next(v for k, v in values.items() if k.startswith("Top-1 accuracy of the onnx-fp32 bundle"))
    assert bundle_top1 == pytest.approx(100 * manifest["accuracy"]["top1"])
    # 2. The accuracy table: every model's figures as metrics.json has them, on the test split it names.
    assert f"on the {metrics['n_test']} images of the held-out test split (metrics.json)" in body
    rows = table_rows(body, "Accuracy")
    assert set(rows) == {"teacher", "student", "baseline"}
    for name, cells in rows.items():
        for cell, key in zip(cells, ("top1", "balanced_accuracy", "macro_f1")):
            assert float(cell) == pytest.approx(metrics[name][key], abs=0.005), (name, key)
    # 3. Parity from the manifest, latency from bench.json with its host, licences, losses, data.
    (parity,) = table_rows(body, "Parity").values()
    assert parity[0].startswith(f"{manifest['parity']['top1_agreement']:.4f} (>= {manifest['parity']['threshold']}")
    bench = json.loads((exported_run / "bench.json").read_text())
    latency = table_rows(body, "Latency")
    assert set(latency) == {"pytorch", "onnxruntime"}
    onnx_row = next(r for r in bench if r["backend"] == "onnxruntime")
    assert latency["onnxruntime"][2] == f"{onnx_row['p50_ms']:.2f}" and onnx_row["host"]["cpu"] in body
    assert "- teacher `tiny-cnn` (random): none (random weights)" in body
    assert table_rows(body, "Losses") == {"`ce`": ["0.5", LOSS_CE], "`kd`": ["0.5", LOSS_KD]}
    labelled = table_rows(body, "Data")["student"][0]
    assert int(labelled) == metrics["student"]["images"]["labelled"]


LOSS_CE = "cross-entropy on the real labels (task term)"
LOSS_KD = "Hinton KD: T² · KL(teacher ‖ student) at temperature T"


def test_cards_parse_as_hub_model_cards(exported_run):
    hub = pytest.importorskip("huggingface_hub")
    for path in (exported_run / "README.md", exported_run / "export" / "onnx-fp32" / "README.md"):
        card = hub.ModelCard.load(path)
        assert card.data.license == "unknown"
        assert {r.metric_type for r in card.data.eval_results} == {"accuracy", "balanced_accuracy", "f1"}
    run_meta, run_body = split_card((exported_run / "README.md").read_text())
    assert "onnx-fp32" in table_rows(run_body, "Parity")
    assert "Top-1 accuracy of the" not in str(run_meta["model-index"])  # a run's card holds the student's figures


def test_a_card_without_its_files_says_so_and_invents_nothing():
    meta, body = split_card(render_card(CardSources("bundle", "onnx-fp32", manifests={"onnx-fp32": {
        "format": "onnx", "precision": "fp32", "runtime": {"name": "onnxruntime"}}})))
    assert meta["license"] == "unknown" and "model-index" not in meta and "metrics" not in meta
    for line in ("Not measured: no metrics.json", "Not measured: no bench.json", "Not recorded: no recipe.yaml"):
        assert line in body
    assert not re.search(r"\d+\.\d\d", body), "no figure without a file it came from"


def test_licences_map_to_a_hub_identifier_or_other():
    from edgedistill.card import hf_licence

    assert hf_licence(["Apache-2.0 (EfficientNet-Lite ImageNet weights)", "none (random weights)"]) == (
        "apache-2.0", None)
    assert hf_licence(["MIT (OpenAI CLIP)", "CreativeML OpenRAIL++-M"])[0] == "other"
    assert hf_licence(["see timm"])[0] == "other"
    assert hf_licence([]) == ("unknown", None)
