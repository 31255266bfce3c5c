"""Synthetic data engine on tiny random pipelines: manifest, resume, sharding, mixing, OOM, curation stage, CLI."""
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgedistill import cli
from edgedistill.data import generation, make_split
from edgedistill.data.curate import synth_stage
from edgedistill.data.generation import check_synth, chunks, generate, my_chunks, parse_shard, plan, read_manifest
from edgedistill.data.generators import HalvingBatcher
from edgedistill.recipe import DataCfg, LossCfg, Recipe, RecipeError, SynthCfg, TeacherCfg
from edgedistill.utils import derived_seed, sha256_file

pytestmark = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None,
                                reason="needs diffusers: pip install 'edgedistill[synth]'")

CLASSES = ["cat", "dog"]
DIMS = {"place": ["a sofa", "a garden", "a beach"], "time": ["noon", "night"]}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """An image folder of 2 classes x 4 random photos (3 train + 1 test after the split)."""
    root = tmp_path_factory.mktemp("real")
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / c).mkdir()
        for k in range(4):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / c / f"{k}.png")
    return root


@pytest.fixture(scope="module")
def split(data_root) -> dict:
    return make_split(DataCfg(root=str(data_root), test_fraction=0.25))


def tiny_recipe(data_root, **synthetic) -> Recipe:
    cfg = {"generator": "tiny-sd", "images_per_class": 3, "batch_size": 2, "dimensions": DIMS,
           "prompt_weights": {"class": 1.5}, **synthetic}
    return Recipe(name="tiny", data=DataCfg(root=str(data_root), test_fraction=0.25, superclass="pet"),
                  teacher=TeacherCfg(name="tiny-clip", head="zeroshot"), loss=LossCfg(feature_l2=1.0),
                  synthetic=SynthCfg(**cfg))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, data_root, split):
    """The whole dataset made by one process: (synth dir, manifest rows)."""
    out = tmp_path_factory.mktemp("one") / "run" / "synth"
    return out, generate(tiny_recipe(data_root), out, split)


def pngs(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*.png")}


def test_manifest_has_one_row_per_image_with_prompt_seed_and_hash(one_process):
    out, rows = one_process
    assert len(rows) == 6 and pngs(out) == {r["file"] for r in rows}
    assert read_manifest(out / "manifest.jsonl") == rows
    for r in rows:
        assert {"class", "prompt", "negative_prompt", "seed", "generator", "steps", "guidance", "size",
                "sha256"} <= set(r)
        assert r["sha256"] == sha256_file(out / r["file"])
        assert r["seed"] == derived_seed(0, "synth", r["class"], r["index"])  # from (class, index) alone
        assert f"({r['class']}:1.5)" in r["prompt"] and (r["steps"], r["guidance"], r["size"]) == (4, 0.5, 32)
        assert Image.open(out / r["file"]).size == (32, 32)
    assert len({r["sha256"] for r in rows}) == 6
    assert json.loads((out / "cost.jsonl").read_text().splitlines()[0])["images"] == 6


def test_deleting_an_image_regenerates_exactly_that_image(one_process, tmp_path, data_root, split, monkeypatch):
    src, rows = one_process
    out = tmp_path / "synth"
    shutil.copytree(src, out)
    lost = out / rows[3]["file"]
    lost.unlink()
    others = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert generate(tiny_recipe(data_root), out, split) == rows
    assert sha256_file(lost) == rows[3]["sha256"]  # byte-identical
    assert all(p.stat().st_mtime_ns == t for p, t in others.items())  # nothing else was rewritten
    # With nothing missing, a re-run does not even build a pipeline.
    monkeypatch.setattr(generation, "load_pipeline", lambda *a, **k: pytest.fail("loaded a pipeline for nothing"))
    assert generate(tiny_recipe(data_root), out, split) == rows


def test_two_shards_make_the_same_images_as_one_process(one_process, tmp_path, data_root, split):
    _, rows = one_process
    out = tmp_path / "synth"
    assert generate(tiny_recipe(data_root), out, split, shard="0/2") is None  # incomplete: no manifest yet
    first = pngs(out)
    assert first and not (out / "manifest.jsonl").exists()
    assert generate(tiny_recipe(data_root), out, split, shard="1/2") == rows
    second = pngs(out) - first
    assert first.isdisjoint(second) and first | second == {r["file"] for r in rows}
    assert all(sha256_file(out / r["file"]) == r["sha256"] for r in rows)


def test_chunks_are_fixed_per_class_and_shards_round_robin(data_root, split):
    jobs = plan(tiny_recipe(data_root), split, DIMS)
    parts = chunks(jobs, 2)
    assert [[(j.group, j.index) for j in c] for c in parts] == [
        [("cat", 0), ("cat", 1)], [("cat", 2)], [("dog", 0), ("dog", 1)], [("dog", 2)]]
    assert my_chunks(parts, (1, 2)) == [parts[1], parts[3]]
    with pytest.raises(ValueError, match="i/n"):
        parse_shard("2/2")


def test_times_train_sizes_the_set_from_the_real_train_split(data_root, split):
    jobs = plan(tiny_recipe(data_root, images_per_class=0, times_train=2.0), split, DIMS)
    assert [sum(j.label == y for j in jobs) for y in range(2)] == [6, 6]  # 2 x 3 train images per class


def test_mix_pairs_follow_p1(data_root, split):
    train_of = {p: y for p, y in split["train"]}
    intra = plan(tiny_recipe(data_root, generator="tiny-sd-variations", mix="intra"), split, {})
    assert all(len(j.sources) == 2 and {train_of[p] for p in j.sources} == {j.label} for j in intra)
    inter = plan(tiny_recipe(data_root, generator="tiny-sd-variations", mix="inter"), split, {})
    assert len(inter) == 6 and all(j.group == "inter" and len(j.sources) == 2 for j in inter)
    assert {tuple(train_of[p] for p in j.sources) for j in inter} & {(0, 1), (1, 0)}  # pairs regardless of class
    single = plan(tiny_recipe(data_root, generator="tiny-sd-variations"), split, {})
    assert [j.sources[0] for j in single[:3]] == [p for p, y in split["train"] if y == 0]


def test_mixing_generates_images_from_two_real_images(tmp_path, data_root, split):
    recipe = tiny_recipe(data_root, generator="tiny-sd-variations", mix="inter", images_per_class=1)
    rows = generate(recipe, tmp_path / "synth", split)
    assert len(rows) == 2 and all(len(r["sources"]) == 2 and r["prompt"] == "" for r in rows)
    assert all((tmp_path / "synth" / r["file"]).exists() for r in rows)


def test_sdxl_family_generates_with_weighted_prompts(tmp_path, data_root, split):
    rows = generate(tiny_recipe(data_root, generator="tiny-sdxl", images_per_class=1), tmp_path / "synth", split)
    assert [r["class"] for r in rows] == CLASSES and "(cat:1.5)" in rows[0]["prompt"]
    assert all(Image.open(tmp_path / "synth" / r["file"]).size == (32, 32) for r in rows)


def test_cuda_oom_halves_the_batch_and_carries_on():
    calls = []

    def fake(jobs):
        calls.append(len(jobs))
        if len(jobs) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return [j * 10 for j in jobs]

    batcher = HalvingBatcher(fake, 8)
    assert batcher(list(range(8))) == [j * 10 for j in range(8)]
    assert batcher.limit == 2 and calls == [8, 4, 2, 2, 2, 2]
    assert batcher([1, 2, 3]) == [10, 20, 30] and calls[-2:] == [2, 1]  # later chunks start at the halved size


@pytest.mark.parametrize("synthetic, message", [
    ({"mix": "inter"}, "mixing real images needs one of"),
    ({"images_per_class": 0}, "exactly one of"),
    ({"prompt_weights": {"clas": 1.5}}, "Did you mean 'class'"),
    ({"templates": ["a photo of a {class}"]}, "may use only {c} and {superclass}"),
    ({"dimensions": {"place": []}}, "no 'synthetic.llm'"),
])
def test_bad_synthetic_settings_fail_before_any_work(data_root, synthetic, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace("{", r"\{")):
        check_synth(tiny_recipe(data_root, **synthetic))


def test_synth_stage_caches_teacher_features_and_curates(one_process, tmp_path, data_root, split):
    from edgedistill.data import resize_normalize, view_image
    from edgedistill.teachers import build_teacher

    shutil.copytree(one_process[0], tmp_path / "synth")
    recipe = tiny_recipe(data_root, curate_dedup=0.99999, curate_leakage=0.5)
    teacher = build_teacher(recipe.teacher)
    with pytest.raises(RecipeError, match="teacher's head"):
        synth_stage(tiny_recipe(data_root, curate_agree=True), tmp_path, teacher, split, "cpu")
    teacher.head = teacher.text_head(CLASSES, recipe.teacher.templates, "pet")
    result = synth_stage(recipe, tmp_path, teacher, split, "cpu")
    report = result["report"]
    assert report["generated"] == 6 and report["kept"] == 6 - report["leakage"] - report["duplicate"]
    assert report["leakage"] == 6  # a random tiny teacher sees every image as close to every other
    curation = json.loads((tmp_path / "synth" / "curation.json").read_text())
    assert len(curation["dropped"]) == 6 and curation["report"] == report
    # The cache holds every generated image; the kept rows point at their own features.
    recipe = tiny_recipe(data_root, curate_dedup=0.99999)
    result = synth_stage(recipe, tmp_path, teacher, split, "cpu")
    assert result["cache"].complete and len(result["items"]) == len(result["rows"]) == result["report"]["kept"]
    path, _ = result["items"][-1]
    x = resize_normalize(view_image(path, "light", None, 1.0), teacher.info.input.to_dict())
    expected = teacher.encode(torch.from_numpy(x)[None])[0]
    torch.testing.assert_close(result["cache"].get([result["rows"][-1]])[0], expected, atol=1e-5, rtol=1e-4)


def write_recipe(path: Path, data_root, synthetic: str) -> Path:
    path.write_text(f"name: tiny\ndata: {{root: {data_root}, test_fraction: 0.25}}\n"
                    f"teacher: {{name: tiny-clip}}\nloss: {{feature_l2: 1.0}}\nsynthetic: {synthetic}\n")
    return path


def test_cli_synth_shards_and_resumes(tmp_path, data_root, one_process):
    recipe = write_recipe(tmp_path / "r.yaml", data_root, "{generator: tiny-sd, images_per_class: 3, batch_size: 2}")
    for shard in ("0/2", "1/2"):
        assert cli.main(["synth", str(recipe), "--out", str(tmp_path / "run"), "--shard", shard]) == 0
    rows = read_manifest(tmp_path / "run" / "synth" / "manifest.jsonl")
    assert len(rows) == 6 and all(r["prompt"] == f"a photo of a {r['class']}" for r in rows)


def test_real_generator_offline_fails_after_validation_naming_the_model(tmp_path, data_root, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", data_root, "{generator: sdxl-lcm, images_per_class: 1}")
    assert cli.main(["synth", str(recipe), "synthetic.generator=sdxl-lcn"]) == 2
    assert "Did you mean ['sdxl-lcm'" in capsys.readouterr().err  # a typo fails at load, before any work
    missing = "edgedistill-tests/no-such-model"  # never downloads, even with internet: the repository does not exist
    args = ["synth", str(recipe), "--out", str(tmp_path / "run"), "synthetic.generator=sd15",
            f"synthetic.model_id={missing}"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert f"edgedistill: error: Generator 'sd15' needs the diffusers weights '{missing}'" in err


def test_tiny_zeroshot_recipe_end_to_end(tmp_path):
    pytest.importorskip("open_clip")
    pytest.importorskip("edgedistill.pipeline")
    out = tmp_path / "run"
    assert cli.main(["recipe", "run", "tiny-zeroshot", "--out", str(out), "train.epochs=1"]) == 0
    rows = read_manifest(out / "synth" / "manifest.jsonl")
    assert len(rows) == 48 and all(r["prompt"] and isinstance(r["seed"], int) for r in rows)
    assert all((out / "synth" / r["file"]).exists() for r in rows)
    metrics = json.loads((out / "metrics.json").read_text())
    assert "student" in metrics
