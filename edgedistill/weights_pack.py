"""Weights packs for air-gapped sites: ``weights pack`` writes one tar, ``weights unpack`` checks and lays it out.

A pack, and the folder ``weights fetch --to DIR`` or ``weights unpack`` writes, holds::

    weights.json     {"format", "recipe": the resolved recipe, "keys": {recipe key: its file or folder},
                      "files": [{"path", "key", "sha256", "bytes"}, ...]}
    recipe.yaml      the resolved recipe, each weights key pointing at its file or folder below
    teacher/ student/ synthetic/ synthetic-lora/    the weights, one folder per recipe key they serve

In a tar, recipe.yaml's weights paths are relative to the tar's root; in a folder they are absolute, so
``edgedistill recipe run DIR/recipe.yaml`` loads nothing from the hub. ``unpack`` extracts with tarfile's ``data``
filter (no absolute paths, no ``..``, no links out of DIR), refuses files weights.json does not list, and checks
every file's size and sha256 before it writes DIR/recipe.yaml (a damaged pack leaves none).
"""
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import yaml

from .local_weights import file_sha256, files_of
from .recipe import load_recipe
from .utils import atomic_write_text, write_json
from .weights import check_weight_paths, fetch

FORMAT = "edgedistill-weights/1"


def layout(found: list) -> tuple[dict, list]:
    """Where each (need, local path) goes: {key: relative file or folder}, [(source file, relative path, key)]."""
    keys, files = {}, []
    for need, path in found:
        p = Path(path)
        if p.is_file():
            keys[need.key] = f"{need.role}/{p.name}"
            files.append((p, keys[need.key], need.key))
        else:
            keys[need.key] = need.role
            files += [(p / r, f"{need.role}/{r}", need.key) for r in files_of(p)]
    return keys, files


def manifest(recipe, keys: dict, files: list) -> dict:
    rows = [{"path": rel, "key": key, "sha256": file_sha256(src), "bytes": src.stat().st_size}
            for src, rel, key in files]
    return {"format": FORMAT, "recipe": recipe.to_dict(), "keys": keys, "files": rows}


def pointed_recipe(recipe: dict, keys: dict, root: Path | None) -> str:
    """The recipe as YAML with each weights key (``section.field``) set to its file or folder under ``root``."""
    recipe = json.loads(json.dumps(recipe))  # a deep copy
    for key, rel in keys.items():
        section, name = key.split(".")
        recipe[section][name] = str(root / rel) if root is not None else rel
    return yaml.safe_dump(recipe, sort_keys=False)


def fetch_into(recipe, to) -> Path:
    """``weights fetch --to DIR``: fetch, then copy every file into DIR with weights.json and recipe.yaml."""
    to = Path(to).resolve()
    keys, files = layout(fetch(recipe))
    for src, rel, _ in files:
        (to / rel).parent.mkdir(parents=True, exist_ok=True)
        if src.resolve() != (to / rel).resolve():
            shutil.copyfile(src, to / rel)  # follows the hub cache's symlinks to the blobs
    write_json(to / "weights.json", manifest(recipe, keys, files))
    atomic_write_text(to / "recipe.yaml", pointed_recipe(recipe.to_dict(), keys, to))
    print(f"{len(files)} files in {to}; run offline with: edgedistill recipe run {to / 'recipe.yaml'}")
    return to / "recipe.yaml"


def pack(recipe, out) -> Path:
    """``weights pack``: fetch what is missing, then one tar of the weights, weights.json and recipe.yaml."""
    out = Path(out)
    keys, files = layout(fetch(recipe))
    meta = manifest(recipe, keys, files)
    tmp = out.with_name(f".{out.name}.partial")
    with tarfile.open(tmp, "w") as tar:
        add_bytes(tar, "weights.json", (json.dumps(meta, indent=2) + "\n").encode())
        add_bytes(tar, "recipe.yaml", pointed_recipe(meta["recipe"], keys, None).encode())
        for src, rel, _ in files:
            tar.add(str(src.resolve()), arcname=rel, recursive=False)
    os.replace(tmp, out)
    size = sum(r["bytes"] for r in meta["files"])
    print(f"{out}: {len(files)} files, {size / 1e6:.1f} MB, for {', '.join(keys) or 'no weights keys'}; on the "
          f"air-gapped machine: edgedistill weights unpack {out.name} DIR")
    return out


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes):
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def unpack(tar_path, dest) -> Path:
    """``weights unpack``: extract into ``dest``, check every sha256, write ``dest/recipe.yaml``; returns its path."""
    from .teachers import WeightsUnavailable

    tar_path, dest = Path(tar_path), Path(dest).resolve()
    try:
        with tarfile.open(tar_path) as tar:
            meta = read_manifest(tar, tar_path)
            listed = {r["path"] for r in meta["files"]} | {"weights.json", "recipe.yaml"}
            extra = sorted(m.name for m in tar.getmembers() if not m.isdir() and m.name not in listed)
            if extra:
                raise WeightsUnavailable(f"{tar_path} carries files its weights.json does not list: {extra[:5]}")
            # recipe.yaml is written below, once every file checks out: a damaged pack never leaves one to run
            tar.extractall(dest, members=[m for m in tar.getmembers() if m.name != "recipe.yaml"], filter="data")
    except (tarfile.TarError, EOFError) as e:
        raise WeightsUnavailable(f"{tar_path} is not a readable weights pack ({type(e).__name__}: {e})") from e
    for row in meta["files"]:
        path = dest / row["path"]
        if path.stat().st_size != row["bytes"] or file_sha256(path) != row["sha256"]:
            raise WeightsUnavailable(f"{tar_path} is damaged: {row['path']} (for {row['key']}) does not match the "
                                     f"sha256 its weights.json records")
    write_json(dest / "weights.json", meta)
    atomic_write_text(dest / "recipe.yaml", pointed_recipe(meta["recipe"], meta["keys"], dest))
    check_weight_paths(load_recipe(dest / "recipe.yaml"))
    print(f"{len(meta['files'])} files checked (sha256) in {dest}; run offline with: "
          f"edgedistill recipe run {dest / 'recipe.yaml'}")
    return dest / "recipe.yaml"


def read_manifest(tar: tarfile.TarFile, tar_path: Path) -> dict:
    from .teachers import WeightsUnavailable

    try:
        meta = json.loads(tar.extractfile("weights.json").read())
    except (KeyError, AttributeError, ValueError) as e:
        raise WeightsUnavailable(f"{tar_path} is not a weights pack: no readable weights.json in it") from e
    if meta.get("format") != FORMAT:
        raise WeightsUnavailable(f"{tar_path} is a weights pack of format {meta.get('format')!r}; this edgedistill "
                                 f"reads {FORMAT!r}")
    return meta
