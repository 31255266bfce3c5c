"""Teacher-feature cache: teacher features of fixed views, computed once and memory-mapped in the run folder.

Probing, evaluation and every distillation epoch read from here, so the teacher never runs twice on the same
view. Rows are marked done as they are written, so a killed extraction resumes where it stopped.
"""
import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from ..utils import derived_seed, progress, write_json
from . import resize_normalize, view_image


def view_seed(path: str, view: int, salt: int = 0) -> int | None:
    """View 0 is the un-augmented image; view v > 0 is a fixed augmentation of it, one per (salt, image, view).

    Real training images use the training seed as ``salt``, so each seed draws its own augmented views. The image
    is named by its bytes, not its path, so the same data and seed give the same views wherever the data folder or
    run folder lies.
    """
    return None if view == 0 else derived_seed("view", salt, image_digest(str(path)), view)


@functools.lru_cache(maxsize=None)
def image_digest(path: str) -> str:
    """sha256 of the image file's bytes (read once per process)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class RealViews:
    """Teacher features of the real training images: view 0 from the shared un-augmented cache, views 1.. from the
    seed's own cache of augmented views (whose view ``v - 1`` is the image's view ``v``)."""

    def __init__(self, base: "FeatureCache", augmented: "FeatureCache | None"):
        self.base, self.augmented, self.dim = base, augmented, base.dim

    def get(self, items, views=None) -> torch.Tensor:
        items = np.asarray(items)
        views = np.zeros_like(items) if views is None else np.asarray(views)
        out = torch.empty(len(items), self.dim)
        plain = views == 0
        if plain.any():
            out[torch.from_numpy(plain)] = self.base.get(items[plain])
        if (~plain).any():
            out[torch.from_numpy(~plain)] = self.augmented.get(items[~plain], views[~plain] - 1)
        return out


class FeatureCache:
    """``features[item, view]`` of one teacher over one list of items, stored as float32 memmaps."""

    def __init__(self, folder, keys: list[str], views: int, dim: int, meta: dict | None = None):
        self.folder, self.keys, self.views, self.dim = Path(folder), list(keys), views, dim
        self.folder.mkdir(parents=True, exist_ok=True)
        shape = (len(self.keys), views, dim)
        info = {"items": len(self.keys), "views": views, "dim": dim, **(meta or {})}
        meta_path = self.folder / "meta.json"
        fresh = not meta_path.exists() or json.loads(meta_path.read_text()) != info
        if fresh:  # a different teacher, item list or view count never reuses old rows
            for name in ("features.f32", "done.u8"):
                (self.folder / name).unlink(missing_ok=True)
            write_json(self.folder / "keys.json", self.keys)
            write_json(meta_path, info)
        mode = "w+" if fresh or not (self.folder / "features.f32").exists() else "r+"
        self.features = np.memmap(self.folder / "features.f32", dtype=np.float32, mode=mode, shape=shape)
        self.done = np.memmap(self.folder / "done.u8", dtype=np.uint8, mode=mode, shape=shape[:2])

    def missing(self) -> list[tuple[int, int]]:
        return [(int(i), int(v)) for i, v in zip(*np.nonzero(self.done == 0))]

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    def get(self, items, views=None) -> torch.Tensor:
        items = np.asarray(items)
        views = np.zeros_like(items) if views is None else np.asarray(views)
        return torch.from_numpy(np.ascontiguousarray(self.features[items, views]))

    def fill(self, teacher, items: list, augment: str, crop_pct: float, batch_size: int = 64, workers: int = 0,
             device="cpu", desc: str = "teacher features", salt: int = 0, first_view: int = 0):
        """Run the teacher on every missing (item, view) and store the result; returns how many were computed.

        Cache view ``v`` holds the image's view ``first_view + v`` under ``salt`` (see ``view_seed``). Rows are
        computed in fixed blocks of ``batch_size`` (item-major order), and a block with any missing row is computed
        whole: a resumed extraction batches exactly as an uninterrupted one, so it writes bit-identical features
        (CPU kernels may round differently for another batch composition).
        """
        pairs = [(i, v) for i in range(len(self.keys)) for v in range(self.views)]
        blocks = [pairs[b:b + batch_size] for b in range(0, len(pairs), batch_size)]
        todo = [block for block in blocks if any(self.done[i, v] == 0 for i, v in block)]
        if not todo:
            return 0
        flat = [pair for block in todo for pair in block]
        ds = _ViewDataset(items, flat, teacher.info.input.to_dict(), augment, crop_pct, salt, first_view)
        sizes = np.cumsum([0] + [len(block) for block in todo])
        batches = [list(range(sizes[k], sizes[k + 1])) for k in range(len(todo))]
        loader = DataLoader(ds, batch_sampler=batches, num_workers=workers)
        teacher.to(device).to(memory_format=torch.channels_last)  # faster convolutions, same numbers
        with progress(total=len(flat), desc=desc, unit="img") as bar:
            for k, (x, idx, view) in enumerate(loader):
                f = teacher.encode(x.to(device).contiguous(memory_format=torch.channels_last)).cpu().numpy()
                self.features[idx.numpy(), view.numpy()] = f
                self.done[idx.numpy(), view.numpy()] = 1
                bar.update(len(idx))
                if k % 8 == 7:
                    self.flush()
        self.flush()
        return len(flat)

    def flush(self):
        self.features.flush()
        self.done.flush()


class _ViewDataset(Dataset):
    def __init__(self, items, todo, spec, augment, crop_pct, salt, first_view=0):
        self.items, self.todo, self.spec, self.augment, self.crop_pct = items, todo, spec, augment, crop_pct
        self.salt, self.first_view = salt, first_view

    def __len__(self):
        return len(self.todo)

    def __getitem__(self, k):
        i, v = self.todo[k]
        path = self.items[i][0]
        img = view_image(path, self.augment, view_seed(path, v + self.first_view, self.salt), self.crop_pct)
        return torch.from_numpy(resize_normalize(img, self.spec)), i, v
