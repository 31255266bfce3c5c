"""The stages every seed and every sweep point share: split, teacher features, teacher head, synthetic data.

Plus each seed's own augmented views of the real training images.
"""
import logging
from pathlib import Path

import numpy as np
import torch

from . import distributed
from .data import IMAGE_EXTENSIONS, make_split, resize_normalize, view_image
from .data.cache import FeatureCache, RealViews
from .evaluate import gflops, params_used
from .recipe import Recipe, to_plain
from .run_folder import STAGE_VERSIONS, Run
from .teacher_runtime import PARITY_IMAGES, feature_teacher
from .teachers import load_head, make_probe_head, save_head
from .utils import fingerprint, read_json, write_json

log = logging.getLogger(__name__)


def stage_split(run: Run) -> dict:
    d = run.recipe.data
    key = fingerprint([d.dataset, d.root, d.classes, d.test_fraction, d.val_fraction, d.max_per_class, d.split_seed,
                       folder_listing(d), d.labels_per_class, d.unlabelled_root,
                       folder_listing(d, d.unlabelled_root) if d.unlabelled_root else ""])
    path = run.shared / "split.json"

    def compute():
        split = make_split(d)
        write_json(path, split)
        if split["skipped"]:
            log.warning("%d unreadable images were skipped (listed in %s)", len(split["skipped"]), path)
        return {"train": len(split["train"]), "labelled": len(split["labelled"]),
                "unlabelled": len(split["unlabelled"]),
                "val": len(split["val"]), "test": len(split["test"]), "skipped": len(split["skipped"]),
                "classes": len(split["classes"])}

    summary = run.stage("split", key, compute if distributed.is_main() else dict)
    distributed.barrier()
    split = read_json(path)
    if distributed.is_main() and run.shared != run.dir:  # export, demo and bench read the split from the run folder
        write_json(run.dir / "split.json", split)
    split["summary"] = summary
    return split


def real_items(split: dict) -> list:
    """The real images a student trains on, in their teacher-feature caches' order: the training split, then the
    unlabelled folder's images (label -1)."""
    return [tuple(it) for it in split["train"]] + [tuple(it) for it in split["unlabelled"]]


def labelled_items(split: dict) -> list:
    """The training images whose labels are used (all of them unless ``data.labels_per_class`` is set)."""
    return [tuple(split["train"][i]) for i in split["labelled"]]


def folder_listing(d, root=None) -> str:
    """A fingerprint of the image files (relative path and size) under an image folder: added, removed or replaced
    images make a new split. Datasets fetched by name are fixed releases and are keyed by their name alone."""
    if root is not None:
        root = Path(root).expanduser()
    elif d.dataset == "imagefolder":
        root = Path(d.root).expanduser()
    elif d.dataset == "conformal-clip-data":
        import conformal_clip_data

        root = Path(conformal_clip_data.textile_simulated_root())
    elif d.dataset.startswith("hf/"):  # which splits and columns are read
        return fingerprint([d.hf_config, d.hf_split, d.hf_test_split, d.hf_image_column, d.hf_label_column])
    else:
        return ""
    if not root.is_dir():
        return "missing"
    files = sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*")
                   if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    return fingerprint(files)


def teacher_key(run: Run) -> str:
    """What the teacher's features depend on: its settings and, when fine-tuned, the fine-tuning stage's key."""
    from .local_weights import weights_id

    t = run.recipe.teacher
    local = [weights_id(t.weights)] if t.weights else []  # the file's sha256, not its path: where it lies is moot
    return fingerprint([t.name, t.arch, t.pretrained, t.image_size, t.n_cls_blocks, t.avgpool, t.pool, t.width,
                        t.depth, t.embed_dim, t.runtime, run.keys.get("finetune")] + local)


def open_caches(run: Run, split: dict, tdim: int, crop: float) -> dict:
    """The shared real-image caches, un-augmented view only: train and eval (val + test)."""
    tkey = teacher_key(run)
    out = {}
    for name, items in {"train": real_items(split), "eval": split["val"] + split["test"]}.items():
        meta = {"teacher": tkey, "crop_pct": crop, "keys": fingerprint(items),
                "version": STAGE_VERSIONS["features"]}
        out[name] = FeatureCache(run.shared / "cache" / f"{name}-{fingerprint(meta)}", [p for p, _ in items], 1,
                                 tdim, meta)
    return out


def view_crop(run: Run, teacher_input: dict) -> float:
    """The centre-crop fraction of every view, the teacher's and the student's alike: ``data.crop_pct``, else the
    teacher's own default (its cached features were computed on that view, so the student must see it too)."""
    return run.recipe.data.crop_pct or teacher_input["crop_pct"]


def stage_features(run: Run, split: dict) -> dict:
    """Teacher features of the un-augmented view of every image, computed once and shared by every seed (train
    images only when real images are trained on); augmented views are each seed's own (``stage_views``)."""
    r = run.recipe
    key = fingerprint([run.keys["split"], teacher_key(run), r.data.crop_pct, r.data.real_train])

    def compute():
        t = run.teacher()
        crop = view_crop(run, t.info.input.to_dict())
        caches = open_caches(run, split, t.feature_dim, crop)
        encoder, runtime = features_teacher(run, split, crop)
        groups = [("eval", split["val"] + split["test"])]
        groups += [("train", real_items(split))] if r.data.real_train else []
        for name, items in groups:
            n = caches[name].fill(encoder, items, r.data.augment, crop, r.teacher.batch_size, r.data.num_workers,
                                  run.device, desc=f"teacher features ({name})")
            log.info("teacher features (%s): %d computed, %d reused", name, n, caches[name].done.size - n)
        return {"dim": t.feature_dim, "input": t.info.input.to_dict(), "crop_pct": crop, "runtime": runtime,
                "gflops": gflops(t.flops_model(), t.info.input.size),
                "params_m": params_used(t.flops_model(), t.info.input.size) / 1e6,
                "info": {"name": t.info.name, "arch": t.info.arch, "weights": t.info.weights,
                         "licence": t.info.licence}}

    run.stage("features", key, compute if distributed.is_main() else dict)
    distributed.barrier()
    summary = read_json(run.stage_file("features"))["summary"]
    return {**summary, "caches": open_caches(run, split, summary["dim"], summary["crop_pct"])}


def stage_views(run: Run, split: dict, feats: dict) -> RealViews | None:
    """Teacher features of this seed's augmented views of the real training images (views 1 .. data.views - 1)."""
    r = run.recipe
    if not r.data.real_train:
        return None
    base, real = feats["caches"]["train"], real_items(split)
    if r.data.views < 2:
        return RealViews(base, None)
    meta = {"teacher": teacher_key(run), "crop_pct": feats["crop_pct"], "augment": r.data.augment,
            "seed": r.train.seed, "keys": fingerprint(real), "version": STAGE_VERSIONS["views"]}
    folder = run.shared / "cache" / f"train-views-{fingerprint(meta)}"
    key = fingerprint([run.keys["features"], meta, r.data.views])

    def compute():
        cache = FeatureCache(folder, [p for p, _ in real], r.data.views - 1, feats["dim"], meta)
        n = cache.fill(features_teacher(run, split, feats["crop_pct"])[0], real, r.data.augment, feats["crop_pct"],
                       r.teacher.batch_size,
                       r.data.num_workers, run.device, desc="teacher features (augmented views)", salt=r.train.seed,
                       first_view=1)
        log.info("teacher features (augmented views): %d computed", n)
        return {"views": r.data.views - 1, "seed": r.train.seed}

    run.stage("views", key, compute if distributed.is_main() else dict)
    distributed.barrier()
    return RealViews(base, FeatureCache(folder, [p for p, _ in real], r.data.views - 1, feats["dim"], meta))


def features_teacher(run: Run, split: dict, crop: float):
    """(the teacher as the feature stages run it, a record of which runtime and why): ``teacher.runtime``, checked
    against PyTorch on the first images of the run's own splits; chosen once per process."""
    if run.feature_runtime is None:
        t = run.teacher()
        spec = t.info.input.to_dict()
        items = (split["val"] + split["test"] + split["train"])[:PARITY_IMAGES]
        sample = torch.from_numpy(np.stack([resize_normalize(view_image(p, "none", None, crop), spec)
                                            for p, _ in items]))
        run.feature_runtime = feature_teacher(t, run.recipe.teacher.runtime, run.shared / "teacher-runtime", sample,
                                              run.device)
    return run.feature_runtime


def class_prompt_names(recipe: Recipe, classes) -> list[str]:
    return [recipe.data.prompt_names.get(c, c.replace("_", " ")) for c in classes]


def stage_head(run: Run, split: dict, feats: dict) -> torch.nn.Module:
    """The teacher's head: probed on cached features (linear/MLP), CLIP's text head, its own classifier, or the head
    fine-tuned with it (``teacher.mode: finetune``)."""
    r, t = run.recipe, run.recipe.teacher
    key = fingerprint([run.keys["features"], t.head, t.templates, r.data.prompt_names, r.data.superclass,
                       t.probe_epochs, t.probe_lr, t.probe_weight_decay, t.probe_batch_size, t.mode])
    path = run.shared / "probe" / "head.pt"

    def compute():
        if t.mode == "finetune":
            head = load_head(run.shared / "teacher" / "head.pt")
        elif t.head == "zeroshot":
            head = run.teacher().text_head(class_prompt_names(r, split["classes"]), t.templates, r.data.superclass)
        elif t.head == "native":
            head, _ = run.teacher().native_head()
        else:
            head = probe(feats["caches"]["train"], split, feats["dim"], t, r.train.seed)
        save_head(head.cpu(), path)
        return {"kind": t.head}

    run.stage("probe", key, compute if distributed.is_main() else dict)
    distributed.barrier()
    head = load_head(path)
    for p in head.parameters():
        p.requires_grad_(False)
    return head


def probe(cache: FeatureCache, split: dict, dim: int, t, seed: int) -> torch.nn.Module:
    """Train a linear or MLP head on frozen, cached teacher features of the un-augmented views of the labelled
    training images (P1 step 1)."""
    torch.manual_seed(seed)
    x = cache.get(np.asarray(split["labelled"]))
    y = torch.tensor([split["train"][i][1] for i in split["labelled"]])
    head = make_probe_head(t.head, dim, len(split["classes"]))
    opt = torch.optim.AdamW(head.parameters(), lr=t.probe_lr, weight_decay=t.probe_weight_decay)
    steps = t.probe_epochs * max(1, len(x) // t.probe_batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    g = torch.Generator().manual_seed(seed)
    for _ in range(t.probe_epochs):
        perm = torch.randperm(len(x), generator=g)
        for b in range(0, len(x), t.probe_batch_size):
            idx = perm[b:b + t.probe_batch_size]
            loss = torch.nn.functional.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return head.eval()


def stage_synth(run: Run, split: dict, feats: dict) -> dict:
    from .data.curate import synth_stage
    from .data.generation import is_complete

    key = fingerprint([run.keys["probe"], to_plain(run.recipe.synthetic), run.recipe.data.views,
                       run.recipe.data.augment, run.recipe.data.prompt_names, run.recipe.data.superclass])
    def compute():
        teacher = run.teacher()
        teacher.head = load_head(run.shared / "probe" / "head.pt", run.device)
        n_eval = len(split["val"]) + len(split["test"])
        eval_features = feats["caches"]["eval"].get(np.arange(n_eval)) if n_eval else None
        result = synth_stage(run.recipe, run.shared, teacher, split, run.device, eval_features=eval_features)
        rows = [int(i) for i in result["rows"]]
        write_json(run.shared / "synth" / "kept.json", {"items": result["items"], "rows": rows,
                                                         "cache": str(result["cache"].folder),
                                                         "report": result.get("report", {})})
        return {"kept": len(result["items"]), "report": result.get("report", {})}

    if distributed.is_main() and not is_complete(run.shared):  # images deleted since: make only those again
        run.stage_file("synth").unlink(missing_ok=True)
    run.stage("synth", key, compute if distributed.is_main() else dict)
    distributed.barrier()
    kept = read_json(run.shared / "synth" / "kept.json")
    meta = read_json(Path(kept["cache"]) / "meta.json")
    cache = FeatureCache(kept["cache"], read_json(Path(kept["cache"]) / "keys.json"), meta["views"], meta["dim"],
                         {k: v for k, v in meta.items() if k not in ("items", "views", "dim")})
    # Synthetic images feed only the distillation terms (P1), so their training label is -1.
    return {"items": [(p, -1) for p, _ in kept["items"]],
            "labels": [y for _, y in kept["items"]], "rows": kept["rows"], "cache": cache, "report": kept["report"]}

