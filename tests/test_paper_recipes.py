"""The papers' recipes: P1 and P2's offline twins end to end, every paper and twin listed, and every hub recipe
failing offline with one message that names each missing download.

- ``tiny-p1`` / ``tiny-p2`` run through ``cli.main`` like a user's ``recipe run``; what they made (the manifest),
  what the student learnt from (metrics.json, log.jsonl) and what fed which loss term are checked, the last on the
  very items the finished run trained on (its stages reused, nothing recomputed).
- ``recipe list`` shows a recipe for each of P1-P4 (by its description) and the twins ``tiny-p1`` .. ``tiny-p4``.
- Each built-in recipe that needs a download (``doctor``'s rule) is run offline on an empty Hugging Face cache:
  exit code 2, one line naming the teacher, the pretrained student, the generator (and LoRA) and a fetched dataset,
  before any stage runs, in a few CPU seconds; and what the cache does hold (a timm student, a generator) loads
  offline, while a generator download that stopped half-way is named.
"""
import json
import time
from pathlib import Path

import pytest
import torch

from edgedistill.cli import main

PAPERS = ("P1", "P2", "P3", "P4")
TWINS = ("tiny-p1", "tiny-p2", "tiny-p3", "tiny-p4")  # tiny-p3, tiny-p4: the P3 / P4 engineers' twins


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_twin(name: str, out) -> dict:
    """``edgedistill recipe run NAME --out OUT`` offline; returns metrics.json."""
    t0 = time.perf_counter()
    assert main(["recipe", "run", name, "--out", str(out)]) == 0
    print(f"{name}: {time.perf_counter() - t0:.1f} s wall")  # shown with pytest -s: the twins' budget is 2 minutes
    return json.loads((out / "metrics.json").read_text())


def trained_items(name: str, out) -> tuple[list, int]:
    """(items the finished run's student trained on, how many are real), rebuilt from its stages, all reused."""
    from edgedistill.checks import load_checked
    from edgedistill.distill import training_items
    from edgedistill.run_folder import Run
    from edgedistill.stages import stage_features, stage_head, stage_split, stage_synth, stage_views

    run = Run(out, load_checked(name))
    split = stage_split(run)
    feats = stage_features(run, split)
    stage_head(run, split, feats)
    synth = stage_synth(run, split, feats)
    items, _, n_real = training_items(run, split, stage_views(run, split, feats), synth)
    assert {"split", "features", "probe", "synth"} <= set(run.reused), "the finished run's stages are reused"
    return items, n_real


def assert_synthetic_feed_distillation_only(name: str, out, metrics: dict):
    """The student's real items carry their labels, its synthetic ones none; and with this recipe's loss an
    unlabelled item never reaches the cross-entropy while every item reaches KD."""
    from edgedistill.checks import load_checked
    from edgedistill.losses.logits import kd
    from edgedistill.objective import loss_terms

    items, n_real = trained_items(name, out)
    manifest = {r["file"] for r in read_jsonl(out / "synth" / "manifest.jsonl")}
    assert n_real == metrics["student"]["images"]["labelled"] and all(y >= 0 for _, y in items[:n_real])
    synthetic = items[n_real:]
    assert len(synthetic) == metrics["student"]["images"]["synthetic"] > 0
    assert all(y == -1 for _, y in synthetic), "synthetic images must carry no label: no cross-entropy on them"
    assert all(Path(p).relative_to(out / "synth").as_posix() in manifest for p, _ in synthetic)

    w = load_checked(name).loss
    torch.manual_seed(0)
    logits, t_logits, labels = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 2, -1, -1])  # 2 real, 2 synthetic
    terms = loss_terms({"logits": logits}, None, t_logits, labels, w, w.temperature, w.label_smoothing)
    assert torch.allclose(terms["ce"], torch.nn.functional.cross_entropy(logits[:2], labels[:2]))
    assert torch.allclose(terms["kd"], kd(logits, t_logits, w.temperature))


def assert_sampled_one_to_one(name: str, out, metrics: dict):
    """Each epoch draws as many synthetic images as real ones (P1: equal frequency, train.real_fraction 0.5); the
    baseline gets the same budget from the real labelled images alone."""
    from edgedistill.checks import load_checked

    real, batch = metrics["student"]["images"]["labelled"], load_checked(name).train.batch_size
    student, baseline = read_jsonl(out / "student" / "log.jsonl"), read_jsonl(out / "baseline" / "log.jsonl")
    assert all(r["steps"] == 2 * real // batch and r["images"] == r["steps"] * batch for r in student + baseline)
    assert "synthetic" not in metrics["baseline"]["images"]


# ---------------------------------------------------------------------------------------------------------------
# The twins, end to end


def test_tiny_p1_mixes_pairs_of_real_images_for_the_kd_term_only(tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "run"
    metrics = run_twin("tiny-p1", out)
    split = json.loads((out / "split.json").read_text())
    train = {p: y for p, y in split["train"]}

    # 10x the training set, each image a mix of two real training images, found regardless of class (P1).
    rows = read_jsonl(out / "synth" / "manifest.jsonl")
    assert len(rows) == 10 * len(train) and all(r["generator"] == "tiny-sd-variations" and not r["prompt"]
                                                for r in rows)
    assert all(len(r["sources"]) == 2 and all(p in train for p in r["sources"]) for r in rows)
    assert all([train[p] for p in r["sources"]] == r["source_labels"] for r in rows)
    assert any(len(set(r["source_labels"])) == 2 for r in rows), "inter-class: pairs across classes"
    assert all((out / "synth" / r["file"]).is_file() for r in rows)

    # The MLP probe on the CLS tokens of the last 2 blocks; the student learnt from both kinds of image.
    head = json.loads((out / "probe" / "head.json").read_text())
    assert head["kind"] == "mlp" and head["dim"] == 2 * 32
    images = metrics["student"]["images"]
    assert images["labelled"] == len(train) and images["unlabelled"] == 0 and images["synthetic"] > 0
    assert_sampled_one_to_one("tiny-p1", out, metrics)
    assert_synthetic_feed_distillation_only("tiny-p1", out, metrics)


def test_tiny_p2_draws_texture_prompts_for_the_alignment_uniformity_and_kd_terms(tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "run"
    metrics = run_twin("tiny-p2", out)
    split = json.loads((out / "split.json").read_text())
    names = {"nominal": "flawless fabric", "local": "fabric with a small defect",
             "global": "fabric with a large defect"}  # the recipe's data.prompt_names

    # 1x the training set, per class, from P2's DTD template "{c} texture".
    rows = read_jsonl(out / "synth" / "manifest.jsonl")
    for label, cls in enumerate(split["classes"]):
        mine = [r for r in rows if r["label"] == label]
        assert len(mine) == sum(1 for _, y in split["train"] if y == label)
        assert {r["prompt"] for r in mine} == {f"{names[cls]} texture"}
    assert all(r["generator"] == "tiny-sd" for r in rows)

    # CE + alignment/uniformity + KD, every term on in training; the teacher a linear probe.
    log = read_jsonl(out / "student" / "log.jsonl")
    assert all({"ce", "align_uniform", "kd"} <= set(r) for r in log)
    assert json.loads((out / "probe" / "head.json").read_text())["kind"] == "linear"
    assert_sampled_one_to_one("tiny-p2", out, metrics)
    assert_synthetic_feed_distillation_only("tiny-p2", out, metrics)


# ---------------------------------------------------------------------------------------------------------------
# recipe list


def test_recipe_list_shows_each_paper_and_its_offline_twin(capsys):
    assert main(["recipe", "list"]) == 0
    rows = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines() if line.strip())
    for paper in PAPERS:
        assert any(desc.startswith(paper) for desc in rows.values()), f"no recipe describes itself as {paper}"
    for twin in TWINS:
        assert twin in rows and rows[twin].startswith("Offline"), twin


# ---------------------------------------------------------------------------------------------------------------
# Offline, every hub recipe: one message naming every missing download


def hub_recipes() -> list[str]:
    """Built-in recipes that need something downloaded, by ``doctor``'s rule (read from the YAML alone: collecting
    stays quick); one that does not load is kept, so that its test fails saying why."""
    from edgedistill.checks import section_presets
    from edgedistill.doctor import recipe_needs
    from edgedistill.recipe import RecipeError, builtin_recipes, load_recipe

    names = []
    for name in builtin_recipes():
        try:
            needs = recipe_needs(load_recipe(name, (), section_presets()))
        except RecipeError:
            needs = True
        names += [name] if needs else []
    return names


def expected_downloads(recipe) -> list[str]:
    """What the message must name, read from the recipe itself: teacher, pretrained student, generator and LoRA,
    a dataset fetched by name."""
    from edgedistill.data.generators import GENERATORS
    from edgedistill.data.remote import remote_name

    t, s, names = recipe.teacher, recipe.student, []
    if t.name == "clip":
        names += [t.arch, t.pretrained]
    elif t.name == "dinov2":
        names.append(t.arch or "vit_small_patch14_dinov2.lvd142m")
    elif t.name == "timm":
        names.append(f"{t.arch}.{t.pretrained}" if t.pretrained else t.arch)
    if s.pretrained and not s.packaged_weights:
        names.append(s.name)
    if recipe.synthetic is not None:
        entry = GENERATORS.get(recipe.synthetic.generator)
        if entry.build is None:
            names.append(recipe.synthetic.model_id or entry.model_id)
        if recipe.synthetic.lora_id or entry.lora_id:
            names.append(recipe.synthetic.lora_id or entry.lora_id)
    dataset = remote_name(recipe.data.dataset)
    if dataset.startswith("torchvision/"):
        names.append(f"the torchvision dataset {dataset[len('torchvision/'):]!r}")
    elif dataset.startswith("hf/"):
        names.append(f"the Hugging Face dataset {dataset[len('hf/'):]!r}")
    if s.init_from.startswith("recipe:"):  # P4's stage 1 runs first: its downloads belong in the same message
        from edgedistill.checks import init_recipe

        names += expected_downloads(init_recipe(recipe))
    return names


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """HF_HOME on an empty folder, HF_HUB_OFFLINE set. huggingface_hub reads HF_HOME when imported, which this test
    process has done, so its cache constant is pointed there as well (its lookups read it on each call)."""
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # timm weights fetched by URL
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    return home


@pytest.mark.parametrize("name", hub_recipes())
def test_offline_hub_recipe_names_every_missing_download_in_one_line(name, tmp_path, empty_hub_cache, capsys):
    from edgedistill.checks import load_checked
    from edgedistill.data.remote import remote_name

    recipe = load_checked(name)
    out = tmp_path / "run"
    # A dataset fetched by name is looked for in an empty folder too (its default is ~/.cache/edgedistill).
    overrides = [f"data.root={tmp_path / 'datasets'}"] if remote_name(recipe.data.dataset) else []
    cpu0 = time.process_time()
    code = main(["recipe", "run", name, "--out", str(out), *overrides])
    cpu = time.process_time() - cpu0
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("edgedistill: error: ") and "Traceback" not in err, err
    for what in expected_downloads(recipe):
        assert what in err, f"{what!r} is not named in: {err}"
    assert str(empty_hub_cache / "hub") in err, "it says where the hub weights are cached"
    assert not any((out / d).exists() for d in ("stages/features.json", "synth", "student")), "no work started"
    # CPU seconds, not wall: other jobs on a shared machine can starve a low-priority test. Nothing is built to find
    # a file missing: building the ViT-g teacher and ViT-S student of p1-dtd first costs some 14 CPU seconds.
    assert cpu < 3, f"{cpu:.1f} CPU seconds before the message"


def cache_pipeline(hub, repo: str):
    """A diffusers pipeline (tiny random SD 1.x) laid out in the hub cache ``hub`` as a download leaves it."""
    from edgedistill.data import tiny_sd

    commit = "0" * 40
    folder = hub / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    tiny_sd.text_pipeline().save_pretrained(folder / "snapshots" / commit)
    return folder / "snapshots" / commit


def cache_timm(hub, name: str):
    """timm's random ``name`` as its hub weights, laid out in the hub cache ``hub`` as timm's download leaves them."""
    import timm
    from safetensors.torch import save_file

    repo = timm.models.get_pretrained_cfg(name).hf_hub_id
    folder = hub / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    (folder / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file(timm.create_model(name, pretrained=False).state_dict(), folder / "snapshots" / ("0" * 40) /
              "model.safetensors")


def test_cached_hub_weights_run_offline_and_a_half_made_generator_is_named(tmp_path, empty_hub_cache, image_folder,
                                                                           capsys):
    """The cache lookups must agree with the loaders: a pretrained student and a generator in the cache pass the
    preflight and load, and a generator whose download stopped half-way (no UNet weights) is named before any work."""
    pytest.importorskip("diffusers")
    from conftest import tiny_recipe, write_recipe

    repo = "edgedistill-tests/tiny-sd"  # no such repository on the Hub: nothing could come from the network
    snapshot = cache_pipeline(empty_hub_cache / "hub", repo)
    cache_timm(empty_hub_cache / "hub", "test_efficientnet")
    r = tiny_recipe(image_folder, baseline=False)
    r["student"] = {"name": "test_efficientnet", "pretrained": True}
    r["synthetic"] = {"generator": "sd15", "model_id": repo, "images_per_class": 2, "steps": 2, "size": 32,
                      "batch_size": 6}
    r["train"] = {**r["train"], "epochs": 1}
    recipe = write_recipe(tmp_path / "r.yaml", r)
    assert main(["recipe", "run", str(recipe), "--out", str(tmp_path / "whole")]) == 0
    capsys.readouterr()
    rows = read_jsonl(tmp_path / "whole" / "synth" / "manifest.jsonl")
    assert len(rows) == 6 and {row["model_id"] for row in rows} == {repo}
    loaded = json.loads((tmp_path / "whole" / "weights.json").read_text())
    assert loaded["student.weights"]["path"].startswith(str(empty_hub_cache / "hub"))

    for weights in (snapshot / "unet").glob("*.safetensors"):
        weights.unlink()
    assert main(["recipe", "run", str(recipe), "--out", str(tmp_path / "half")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("edgedistill: error: ")]
    assert len(errors) == 1 and f"Generator 'sd15' needs the diffusers weights '{repo}'" in errors[0], errors
    assert not (tmp_path / "half" / "stages" / "features.json").exists()
