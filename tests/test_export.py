"""Export: the format table, the parity gate, bundles and manifests, on tiny students trained in seconds."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgedistill import cli
from edgedistill.runtime.preprocess import preprocess
from edgedistill.runtime.run import BundleError, load_bundle
from edgedistill.recipe import ExportCfg, Recipe, RecipeError, build, dump_recipe
from edgedistill.students import build_student, save_student
from edgedistill.teachers import InputSpec

pytest.importorskip("onnx", reason="export tests need onnx (pip install 'edgedistill[onnx]')")
pytest.importorskip("onnxruntime", reason="export tests need onnxruntime (pip install 'edgedistill[onnx]')")

CLASSES = ["red", "green", "blue"]
SPEC = InputSpec(size=48, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bilinear", crop_pct=0.9)


def colour_images(folder: Path, per_class: int, seed: int) -> list:
    """Images of three classes told apart by their dominant colour, in several sizes and PIL modes."""
    rng = np.random.default_rng(seed)
    items = []
    for label in range(len(CLASSES)):
        for i in range(per_class):
            h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
            pixels = rng.integers(0, 110, (h, w, 3))
            pixels[..., label] += 140
            img = Image.fromarray(pixels.astype(np.uint8))
            img = img.convert("RGBA") if i % 5 == 0 else img
            path = folder / CLASSES[label] / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path)
            items.append([str(path), label])
    return items


def fit_head(student, items):
    """Least-squares fit of the head on frozen random-backbone features, so logits have real margins."""
    x = torch.from_numpy(np.stack([preprocess(Image.open(p), SPEC.to_dict()) for p, _ in items]))
    y = torch.tensor([label for _, label in items])
    with torch.no_grad():
        features = student.eval().backbone(x)
        f = torch.cat([features, torch.ones(len(features), 1)], 1)
        head = student.classifier if student.classifier is not None else student.proj
        target = 8.0 * torch.eye(len(CLASSES))[y] if student.classifier is not None else student.zero_shot.text[y]
        solution = torch.linalg.lstsq(f, target).solution.T
        head.weight.copy_(solution[:, :-1])
        head.bias.copy_(solution[:, -1])
    return student


def make_run(root: Path, zero_shot: bool = False, student: str = "test_efficientnet", student_pool: str = "avg",
             **sections) -> Path:
    """A run folder as the pipeline writes it: recipe.yaml, split.json, student/model.pt, metrics.json.

    ``sections`` add recipe sections (e.g. ``synthetic``) to the recipe the student is saved with.
    """
    torch.manual_seed(0)
    train, test = colour_images(root / "data" / "train", 16, 0), colour_images(root / "data" / "test", 10, 1)
    raw = {"name": "tiny", "student": {"name": student, "pool": student_pool}, "data": {"image_size": SPEC.size},
           "loss": {"feature_l2": 1.0} if zero_shot else {"ce": 1.0}, "eval": {"zero_shot": zero_shot}, **sections}
    recipe = build(Recipe, raw, "")
    text = torch.nn.functional.normalize(torch.randn(len(CLASSES), 16), dim=-1) if zero_shot else None
    model = fit_head(build_student(recipe, len(CLASSES), 16, text), train)
    run = root / "run"
    extra = {"teacher": {"name": "tiny", "arch": "test", "weights": "random", "licence": "none (random weights)"}}
    save_student(run / "student" / "model.pt", model, recipe, CLASSES, SPEC, extra)
    (run / "recipe.yaml").write_text(dump_recipe(recipe))
    (run / "split.json").write_text(json.dumps({"classes": CLASSES, "train": train, "val": [], "test": test,
                                                "skipped": []}))
    (run / "metrics.json").write_text(json.dumps({"student": {"top1": 1.0}}))
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def exported(run_dir):
    """The acceptance flow on a tiny student: onnx + openvino at fp32 + int8 through the CLI."""
    pytest.importorskip("openvino", reason="needs openvino (pip install 'edgedistill[openvino]')")
    pytest.importorskip("nncf", reason="needs nncf (pip install 'edgedistill[openvino]')")
    code = cli.main(["export", str(run_dir), "--formats", "onnx,openvino", "--precision", "fp32,int8"])
    assert code == 0
    return run_dir / "export"


def test_four_bundles_pass_parity_with_full_manifests(exported):
    names = sorted(p.parent.name for p in exported.glob("*/manifest.json"))
    assert names == ["onnx-fp32", "onnx-int8", "openvino-fp32", "openvino-int8"]
    for name in names:
        m = json.loads((exported / name / "manifest.json").read_text())
        assert m["parity"]["passed"] and m["parity"]["images"] == 30
        assert m["parity"]["top1_agreement"] >= (0.97 if name.endswith("int8") else 0.995)
        assert "split test" in m["parity"]["source"] and m["accuracy"]["split"] == "test"
        assert m["class_names"] == CLASSES and m["output"]["kind"] == "logits"
        assert m["preprocess"]["mean"] == [0.5] * 3 and m["preprocess"]["crop_pct"] == 0.9
        assert m["preprocess"]["channel_order"] == "RGB" and m["opset"] >= 17
        assert m["licences"]["teacher"]["licence"] == "none (random weights)"
        assert set(m["files"]) >= {m["model_file"], "reference.npz"}
        assert m["accuracy"]["top1"] is not None and m["accuracy"]["fp32_top1"] is not None
        assert "onnxruntime" in m["versions"] and "torch" in m["versions"]
        assert m["host"]["cores"] >= 1 and isinstance(m["host"]["isa"], list) and m["host"]["cpu"]  # where parity ran


def test_fp32_matches_pytorch_closely(exported):
    for name in ("onnx-fp32", "openvino-fp32"):
        parity = json.loads((exported / name / "manifest.json").read_text())["parity"]
        assert parity["top1_agreement"] == 1.0
        assert parity["cosine_min"] > 0.9999 and parity["max_abs_error"] < 1e-3


def test_int8_is_really_quantized(exported):
    m = json.loads((exported / "onnx-int8" / "manifest.json").read_text())
    calibration = m["quantization"]["calibration"]
    # every training image but the 24 held back for selection (fewer than the 300 asked)
    assert calibration["images"] == 24 and calibration["selection_images_excluded"] == 24
    import onnx

    graph = onnx.load(str(exported / "onnx-int8" / "model.onnx")).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.node}
    (head,) = [n for n in graph.node if "scores" in n.output]
    assert head.op_type == "Gemm"   # the class scores come out in float, not rounded to 256 levels
    ov_m = json.loads((exported / "openvino-int8" / "manifest.json").read_text())
    assert "FakeQuantize" in (exported / "openvino-int8" / "model.xml").read_text()
    assert ov_m["runtime"]["inference_precision"] == "f32"


def test_summary_reports_each_artifact_beside_fp32(exported):
    summary = (exported / "summary.md").read_text()
    for name in ("onnx-fp32", "onnx-int8", "openvino-fp32", "openvino-int8"):
        assert name in summary
    assert "FP32 top-1" in summary


def test_manifests_name_a_selection_split_apart_from_the_whole_test_split(exported, run_dir):
    """Attempts are chosen on images held back from training, and parity is measured on every test image."""
    split = json.loads((run_dir / "split.json").read_text())
    held_back = json.loads((exported / "selection.json").read_text())
    chosen = {str(Path(p).resolve()) for p, _ in held_back["items"]}
    assert len(chosen) == 24 and held_back["split"] == "train-holdout"   # half of the 48 train images, stratified
    assert sorted(y for _, y in held_back["items"]) == [0] * 8 + [1] * 8 + [2] * 8
    assert not chosen & {str(Path(p).resolve()) for p, _ in split["test"]}
    assert chosen <= {str(Path(p).resolve()) for p, _ in split["train"]}
    for name in ("onnx-fp32", "onnx-int8", "openvino-fp32", "openvino-int8"):
        m = json.loads((exported / name / "manifest.json").read_text())
        assert m["selection"]["split"] == "train-holdout" and m["selection"]["images"] == 24
        assert m["parity"]["split"] == "test" and m["parity"]["images"] == len(split["test"]) == 30
        assert m["accuracy"]["images"] == len(split["test"])
        assert 0 <= m["selection"]["chosen_attempt"] < len((m["quantization"] or {}).get("attempts", [None]))


def test_parity_covers_the_whole_test_split_however_large(run_dir, tmp_path):
    """No sampling: a 240-image test split is measured on all 240 (the old default measured 200 of them)."""
    from edgedistill.export.bundle import ExportJob

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("export"))
    split = json.loads((run / "split.json").read_text())
    (run / "split.json").write_text(json.dumps({**split, "test": split["test"] * 8}))
    job = ExportJob.create(run, ExportCfg())
    assert len(job.parity.x) == 240 and job.parity.split == "test" and "all 240 images" in job.parity.source
    capped = ExportJob.create(run, ExportCfg(parity_images=50))   # a quick look, and it says so
    assert len(capped.parity.x) == 50 and "the first 50 of 240 images" in capped.parity.source


def test_selection_is_the_val_split_when_the_run_has_one(run_dir):
    from edgedistill.export.images import image_pools

    split = json.loads((run_dir / "split.json").read_text())
    split = {**split, "val": split["train"][:6], "train": split["train"][6:]}
    pools = image_pools(run_dir, split, {"data": {"real_train": True}}, ExportCfg())
    assert pools.selection_info["split"] == "val" and pools.selection == [tuple(i) for i in split["val"]]
    assert len(pools.training) == len(split["train"]) == 42 and len(pools.parity) == len(split["test"])
    with pytest.raises(AssertionError, match="1 selection images are also parity images"):
        image_pools(run_dir, {**split, "val": split["val"] + split["test"][:1]}, {}, ExportCfg())


def test_int8_attempt_is_chosen_without_looking_at_the_test_split(run_dir, tmp_path, monkeypatch):
    """The test split would favour the second attempt; the first one agrees on the selection split, so it ships and
    its test-split figure, measured once, decides: the export fails rather than trying the next attempt."""
    from edgedistill.export import ExportError, export_run, parity
    from edgedistill.export import onnx as onnx_backend
    from edgedistill.export.images import load_pixels, to_inputs

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("export"))
    split = json.loads((run / "split.json").read_text())
    test_x = to_inputs(load_pixels([p for p, _ in split["test"]], SPEC.to_dict()), SPEC.to_dict())
    ladder = ({"mode": "full"}, {"mode": "keep_ends_float"})
    monkeypatch.setattr(onnx_backend, "attempts", lambda precision: ladder if precision == "int8" else ({},))
    real_load, test_runs = parity.load_bundle, []

    def load(folder, **kwargs):
        # The first attempt disagrees with PyTorch on every test image and only there; the second agrees on the test
        # images and disagrees everywhere else. Chosen on the selection split, the first must ship, and fail.
        bundle = real_load(folder, **kwargs)
        predict = bundle.predict

        def spy(x):
            scores = predict(x)
            if x.shape == test_x.shape and np.array_equal(x, test_x):
                test_runs.append(Path(folder).name)
                return np.roll(scores, 1, axis=1) if Path(folder).name.endswith("try0") else scores
            return np.roll(scores, 1, axis=1) if Path(folder).name.endswith("try1") else scores
        bundle.predict = spy
        return bundle

    monkeypatch.setattr(parity, "load_bundle", load)
    cfg = ExportCfg(formats=("onnx",), precision=("int8",), calibration_images=16, min_agreement_int8=0.9,
                    selection_margin=0.0)
    with pytest.raises(ExportError, match=r"onnx-int8: top-1 agreement 0\.0+ < 0.9 on 30 split test images"):
        export_run(run, cfg=cfg)
    m = json.loads((run / "export" / "onnx-int8" / "manifest.json").read_text())
    assert test_runs == [".onnx-int8.try0"]   # the test split was run once, on the attempt already chosen
    modes = [a["mode"] for a in m["quantization"]["attempts"]]
    assert modes == ["full", "keep_ends_float"] and m["selection"]["chosen_attempt"] == 0
    assert m["selection"]["top1_agreement"] >= 0.9 and m["parity"]["passed"] is False


def test_calibration_uses_only_kept_synthetic_images_and_never_selection_images(tmp_path):
    """Generated images curation dropped (e.g. near-copies of test images) and the selection images stay out of the
    INT8 calibration and fine-tuning pool."""
    from edgedistill.export.bundle import ExportJob
    from edgedistill.export.images import image_pools, load_pixels

    run = make_run(tmp_path, synthetic={"generator": "tiny-sd", "images_per_class": 2})
    synth = colour_images(run / "synth" / "images", 4, seed=7)
    dropped = [item for i, item in enumerate(synth) if i % 2]
    for p, _ in dropped:   # a colour no real or kept image has, so it is recognisable in the calibration pixels
        Image.new("RGB", (50, 50), (255, 0, 255)).save(p)
    with open(run / "synth" / "manifest.jsonl", "w") as f:   # what the generator wrote: every image
        f.writelines(json.dumps({"path": p, "label": y}) + "\n" for p, y in synth)
    kept = [item for item in synth if item not in dropped]
    (run / "synth" / "kept.json").write_text(json.dumps({"items": kept, "rows": [], "report": {}}))
    job = ExportJob.create(run, ExportCfg(calibration_images=1000))
    pixels, info = job.calibration_pixels()
    seen = {p.tobytes() for p in pixels}
    assert info["synthetic"] == len(kept) == 6 and info["real_train"] == 48 - 24
    assert not seen & {p.tobytes() for p in load_pixels([p for p, _ in dropped], SPEC.to_dict())}
    assert not seen & {p.tobytes() for p in job.selection.pixels} and len(job.selection.pixels) == 24
    synthetic_only = image_pools(run, job.split, {"data": {"real_train": False}, "synthetic": {}}, job.cfg)
    assert synthetic_only.training == [] and synthetic_only.training_info["synthetic"] == 0   # no section: none
    synthetic_only = image_pools(run, job.split, {"data": {"real_train": False}, "synthetic": {"x": 1}}, job.cfg)
    assert sorted(synthetic_only.training) == sorted((str(p), y) for p, y in kept)


def test_bundle_predictions_match_pytorch_on_images(exported, run_dir):
    from edgedistill.students import LogitsOnly, load_student

    student, saved = load_student(run_dir)
    split = json.loads((run_dir / "split.json").read_text())
    images = [Image.open(p) for p, _ in split["test"][:8]]
    with torch.inference_mode():
        ref = LogitsOnly(student)(torch.from_numpy(np.stack([preprocess(i, saved["input"]) for i in images]))).numpy()
    bundle = load_bundle(exported / "openvino-fp32")
    np.testing.assert_allclose(bundle.predict_images(images), ref, rtol=1e-3, atol=1e-3)


def test_altered_file_fails_sha256_check(exported, tmp_path):
    import shutil

    copy = tmp_path / "onnx-fp32"
    shutil.copytree(exported / "onnx-fp32", copy)
    (copy / "reference.npz").unlink()
    with pytest.raises(BundleError, match="incomplete: reference.npz is missing"):
        load_bundle(copy)
    shutil.copy(exported / "onnx-fp32" / "reference.npz", copy)
    with open(copy / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match=r"model.onnx changed after export \(sha256"):
        load_bundle(copy)


@pytest.mark.parametrize("formats,precisions,match", [
    (["onnx"], ["fp16"], r"Unsupported format/precision pair\(s\) \['onnx-fp16'\]. Supported: onnx: fp32, int8"),
    (["onnnx"], ["fp32"], "Unknown export format 'onnnx'. Did you mean 'onnx'"),
    (["onnx"], ["int4"], "Unknown precision 'int4'"),
])
def test_unsupported_requests_name_the_supported_pairs(formats, precisions, match):
    from edgedistill.export import check_export_request

    with pytest.raises(RecipeError, match=match):
        check_export_request(formats, precisions)


def test_cli_reports_unsupported_pair_without_traceback(run_dir, capsys):
    assert cli.main(["export", str(run_dir), "--formats", "onnx", "--precision", "fp16"]) == 2
    assert "openvino: fp32, fp16, int8" in capsys.readouterr().err


def test_recipe_validation_checks_export_pairs():
    from edgedistill.checks import check_registered_names

    recipe = build(Recipe, {"student": {"name": "test_efficientnet"}, "loss": {"ce": 1.0},
                            "export": {"formats": ["tensorrt"], "precision": ["int4"]}}, "")
    with pytest.raises(RecipeError, match="int4"):
        check_registered_names(recipe)


def test_tensorrt_without_gpu_says_so_and_other_formats_go_on(run_dir, caplog):
    from edgedistill.export import export_run
    from edgedistill.export.tensorrt import unavailable

    if unavailable() is None:
        pytest.skip("this host can build TensorRT engines")
    paths = export_run(run_dir, formats=["tensorrt", "onnx"], precisions=["fp32"])
    assert [p.name for p in paths] == ["onnx-fp32"]
    messages = [r.getMessage() for r in caplog.records if "TensorRT export skipped" in r.getMessage()]
    assert len(messages) == 1 and "build_engine.py" in messages[0]


def test_parity_gate_fails_loudly_when_the_artifact_disagrees(run_dir, monkeypatch):
    """An exporter that ships different weights must be caught, not silently written."""
    from edgedistill.export import ExportError, export_run
    from edgedistill.export import onnx as onnx_backend

    real = onnx_backend.export_onnx

    def tampered(model, path, *args):
        broken = type(model)(model.student)
        broken.load_state_dict(model.state_dict())
        with torch.no_grad():
            broken.student.classifier.weight.copy_(torch.randn_like(broken.student.classifier.weight) * 10)
        return real(broken, path, *args)

    monkeypatch.setattr(onnx_backend, "export_onnx", tampered)
    with pytest.raises(ExportError, match=r"onnx-fp32: top-1 agreement 0\.\d+ < 0.995"):
        export_run(run_dir, cfg=ExportCfg(formats=("onnx",), precision=("fp32",)))
    manifest = json.loads((run_dir / "export" / "onnx-fp32" / "manifest.json").read_text())
    assert manifest["parity"]["passed"] is False
    with pytest.warns(UserWarning, match="failed its parity check"):
        load_bundle(run_dir / "export" / "onnx-fp32")
    monkeypatch.undo()
    export_run(run_dir, formats=["onnx"], precisions=["fp32"])  # leave a good bundle for the other tests


def test_static_batch_bundle_runs_any_batch(run_dir, tmp_path):
    import shutil

    from edgedistill.export import export_run

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("export"))
    export_run(run, cfg=ExportCfg(formats=("onnx",), precision=("fp32",), dynamic_batch=False, simplify=True))
    bundle = load_bundle(run / "export" / "onnx-fp32")
    assert bundle.manifest["input"]["shape"][0] == 1
    x = np.random.default_rng(0).standard_normal((3, 3, 48, 48), dtype=np.float32)
    assert bundle.predict(x).shape == (3, 3)


def test_zero_shot_student_exports_class_scores(tmp_path):
    from edgedistill.export import export_run

    run = make_run(tmp_path, zero_shot=True)
    (path,) = export_run(run, formats=["onnx"], precisions=["fp32"])
    m = json.loads((path / "manifest.json").read_text())
    assert m["output"]["kind"] == "zero_shot_scores" and m["output"]["shape"] == ["batch", 3]
    assert m["parity"]["passed"]
    scores = load_bundle(path).predict(np.zeros((2, 3, 48, 48), np.float32))
    assert scores.shape == (2, 3) and np.abs(scores).max() <= 100.0 + 1e-3  # scaled cosine similarities


def test_import_edgedistill_export_stays_light():
    code = ("import sys, edgedistill, edgedistill.export, edgedistill.bench, edgedistill.export.onnx, "
            "edgedistill.export.openvino, edgedistill.export.tensorrt\n"
            "heavy = [m for m in ('onnx', 'onnxruntime', 'openvino', 'nncf', 'tensorrt', 'matplotlib') "
            "if m in sys.modules]\nassert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_formats_table_drives_docs():
    from edgedistill.export import FORMATS, formats_markdown

    table = formats_markdown()
    assert all(f"`{name}`" in table for name in FORMATS)
    readme = (Path(__file__).resolve().parents[1] / "export" / "README.md").read_text()
    assert table in readme, "export/README.md's format table is stale: paste edgedistill.export.formats_markdown()"


def test_module_path_maps_exported_node_names_back_to_student_layers():
    from edgedistill.export.quantize import module_path

    assert module_path("/student/backbone/blocks/blocks.0/blocks.0.1/conv_dw/Conv") == "student.backbone.blocks.0.1.conv_dw"
    assert module_path("/student/backbone/conv_stem/Conv/WithoutBiases") == "student.backbone.conv_stem"
    assert module_path("/student/classifier/Gemm") == "student.classifier"


def test_sensitive_float_keeps_the_ranked_layers_in_float(run_dir):
    """The sensitive_float attempt leaves exactly the top-ranked student layers' convs un-quantized in ONNX."""
    import onnx

    from edgedistill.export.bundle import ExportJob
    from edgedistill.export.onnx import float_nodes
    from edgedistill.export.quantize import sensitivity_ranking
    from edgedistill.recipe import ExportCfg

    job = ExportJob.create(run_dir, ExportCfg(calibration_images=16, parity_images=8))
    ranking = sensitivity_ranking(job)
    convs = [n.name for n in onnx.load(str(job.onnx_fp32())).graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert len(ranking) >= len(convs) > 2
    kept = float_nodes(job.onnx_fp32(), "sensitive_float", job, keep=2)
    from edgedistill.export.quantize import module_path
    assert {module_path(n) for n in kept if n in convs} == set(ranking[:2])
    shutil.rmtree(job.out_root / ".work")


def test_int8_sensitivity_ranking_leaves_out_a_projection_head_the_exported_network_never_runs(tmp_path):
    """feature_l2 trains the student through a projection head that the exported network (classifier scores) never
    runs: the ranking leaves it out instead of failing on it (it raised KeyError: 'student.proj')."""
    from edgedistill.export.bundle import ExportJob
    from edgedistill.export.quantize import sensitivity_ranking

    run = make_run(tmp_path, loss={"ce": 0.1, "hard_kd": 0.9, "feature_l2": 1.0})
    job = ExportJob.create(run, ExportCfg(calibration_images=16, parity_images=8))
    assert job.model.student.proj is not None and job.model.student.classifier is not None
    ranking = sensitivity_ranking(job)
    assert "student.proj" not in ranking and "student.classifier" in ranking and len(ranking) > 2
    from edgedistill.export.onnx import float_nodes
    from edgedistill.export.quantize import module_path
    kept = float_nodes(job.onnx_fp32(), "sensitive_float", job, keep=2)  # the exported graph names the same layers
    assert {module_path(n) for n in kept} >= set(ranking[:2])
    shutil.rmtree(job.out_root / ".work")


def test_int8_simulation_matches_onnxruntime_int8(run_dir):
    """The fine-tuning's simulated INT8 reproduces what ONNX Runtime's INT8 graph computes, far closer than float."""
    import onnxruntime as ort

    from edgedistill.export import qat
    from edgedistill.export.bundle import ExportJob
    from edgedistill.export.onnx import quantize_qdq
    from edgedistill.export.parity import pytorch_scores

    job = ExportJob.create(run_dir, ExportCfg(calibration_images=32, parity_images=30))
    calib, _ = job.calibration()
    quantize_qdq(job.onnx_fp32(), job.out_root / ".work" / "q.onnx", calib)
    session = ort.InferenceSession(str(job.out_root / ".work" / "q.onnx"), providers=["CPUExecutionProvider"])
    int8 = session.run(None, {"input": job.parity.x})[0]
    ranges, undo = qat.simulate_int8(job.model)
    try:
        qat.calibrate(job.model, ranges, calib)
        simulated = pytorch_scores(job.model, job.parity.x)
    finally:
        undo()
    assert np.abs(simulated - int8).mean() < 0.5 * np.abs(job.parity.reference - int8).mean()
    assert np.allclose(pytorch_scores(job.model, job.parity.x), job.parity.reference, atol=1e-5)  # undo is complete
    shutil.rmtree(job.out_root / ".work")


def test_int8_finetune_tunes_a_copy_and_leaves_the_student(run_dir):
    from edgedistill.export import qat
    from edgedistill.export.bundle import ExportJob
    from edgedistill.export.parity import pytorch_scores

    job = ExportJob.create(run_dir, ExportCfg(calibration_images=16, parity_images=8))
    before = {k: v.clone() for k, v in job.model.state_dict().items()}
    calib, _ = job.calibration()
    tuned, info = qat.finetune(job.model, calib, calib, calib, steps=6, recalibrate_every=3, lr=1e-3)
    assert all(torch.equal(before[k], v) for k, v in job.model.state_dict().items())
    assert tuned.state_dict().keys() == before.keys()   # a plain model again: no parametrizations left behind
    assert [h["step"] for h in info["history"]] == [0, 3, 6] and info["chosen_step"] in (0, 3, 6)
    # What the record claims is what the returned weights do under simulated INT8 on the held-out images, so the
    # step it reports choosing is the one that ships.
    ranges, undo = qat.simulate_int8(tuned)
    try:
        qat.calibrate(tuned, ranges, calib)
        agreement, _ = qat.held_out_quality(tuned, calib, pytorch_scores(job.model, calib))
    finally:
        undo()
    chosen = next(h for h in info["history"] if h["step"] == info["chosen_step"])
    assert agreement == info["simulated_agreement_after"] == chosen["agreement"]
    assert chosen["agreement"] == max(h["agreement"] for h in info["history"])
    changed = any(not torch.equal(before[k], v) for k, v in tuned.state_dict().items())
    assert changed == (info["chosen_step"] > 0)


def test_int8_finetune_attempt_is_recorded_in_the_manifest(run_dir, tmp_path, monkeypatch):
    from edgedistill.export import export_run
    from edgedistill.export import onnx as onnx_backend

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("export"))
    ladder = ({"mode": "sensitive_float", "keep": 1, "finetune": True},)
    monkeypatch.setattr(onnx_backend, "attempts", lambda precision: ladder if precision == "int8" else ({},))
    export_run(run, cfg=ExportCfg(formats=("onnx",), precision=("int8",), calibration_images=16,
                                  int8_finetune_steps=4))
    m = json.loads((run / "export" / "onnx-int8" / "manifest.json").read_text())
    finetune = m["quantization"]["finetune"]
    assert finetune["steps"] == 4 and len(finetune["float_modules"]) == 1
    assert m["quantization"]["attempts"] == [{**ladder[0], "selection_agreement": m["selection"]["top1_agreement"]}]
    # The fine-tuning picked its step on the selection images, and the agreement its simulation promised there is
    # what the shipped INT8 bundle delivers on them (within one image).
    assert finetune["validation_split"] == m["selection"]["split"] == "train-holdout"
    assert finetune["validation_images"] == m["selection"]["images"] == 24
    assert abs(finetune["simulated_agreement_after"] - m["selection"]["top1_agreement"]) <= 1 / 24
    assert m["parity"]["passed"] and load_bundle(run / "export" / "onnx-int8").predict(np.zeros((1, 3, 48, 48),
                                                                                       np.float32)).shape == (1, 3)
