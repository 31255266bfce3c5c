"""``edgedistill push``: a bundle, or a run folder's student with its bundles, to a Hugging Face Hub model repo.

The card (``README.md``) is rewritten from the files as they are now (``card.py``), then the upload layout is
assembled, with the card at the top:

- a bundle (``RUN/export/<format>-<precision>/``): ``README.md``, ``manifest.json``, every file the manifest lists
  (its sha256 checked first) and the bundle's own ``bench.json``/``bench.md``/``bench.png`` when present;
- a run folder: ``README.md``, ``recipe.yaml``, ``metrics.json``, ``report.md`` and its ``confusion-*.png``,
  ``bench.*``, ``student/model.pt`` (the exported student: the run's own, or with ``--seeds N`` seed-0's) and each
  of its bundles as ``export/<format>-<precision>/`` in the bundle layout above. ``split.json`` (local image paths),
  caches, checkpoints and the baseline stay home.

``--to-dir DIR`` writes exactly that layout into DIR (new or empty) and touches no network; otherwise the layout is
uploaded with ``HfApi.create_repo(exist_ok=True)`` and ``HfApi.upload_folder``. No token, offline mode, an
unreachable Hub or a refusal is a ``HubError``: one line, exit code 2.
"""
import os
import shutil
import tempfile
from pathlib import Path

from .card import bundle_folders, exported_dir, write_bundle_card, write_run_cards
from .utils import read_json

RUN_FILES = ("recipe.yaml", "metrics.json", "report.md")
BENCH_FILES = ("bench.json", "bench.md", "bench.png")
NETWORK_MODULES = ("huggingface_hub", "httpx", "httpx2", "requests", "urllib3")  # whose errors mean "no upload"


class HubError(RuntimeError):
    """The upload cannot happen (no token, offline, Hub unreachable or refusing); the message says which."""


def push(path, repo_id: str, private: bool = False, to_dir=None) -> str:
    """Upload a bundle or a run folder with its card to the Hub model repo ``repo_id``, or write the layout locally.

    Args:
        path: a bundle folder (``manifest.json``) or a run folder (``student/model.pt``, or ``seed-0/student``).
        repo_id: ``owner/name`` of the Hub model repository; created when it does not exist.
        private: create the repository private (the Hub ignores it for a repository that exists already).
        to_dir: write the files into this new or empty folder, exactly as they would lie in the repo; no network.

    Returns:
        The repository's URL, or the folder written.
    """
    path = Path(path)
    check_repo_id(repo_id)
    api = None if to_dir is not None else hub_api()  # token and offline mode are checked before any work
    files = upload_layout(path)
    if to_dir is not None:
        write_layout(files, Path(to_dir))
        return str(to_dir)
    with tempfile.TemporaryDirectory(prefix="edgedistill-push-") as tmp:
        folder = Path(tmp) / "repo"
        write_layout(files, folder)
        return upload(api, folder, repo_id, private)


def check_repo_id(repo_id: str):
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubError(f"{repo_id!r} is not a Hub repository id (owner/name): {e}") from e
    if "/" not in repo_id:
        raise HubError(f"{repo_id!r} is not a Hub repository id: give owner/name, e.g. my-user/{repo_id}")


def hub_api():
    """An ``HfApi``, after checking that huggingface_hub may reach the network and has a token."""
    import huggingface_hub as hf
    from huggingface_hub import constants

    if constants.is_offline_mode():
        raise HubError("cannot push: HF_HUB_OFFLINE is set, so huggingface_hub makes no network call; unset it, or "
                       "write the files with --to-dir DIR")
    if not hf.get_token():
        raise HubError("cannot push: no Hugging Face token; run `hf auth login` or set HF_TOKEN (or write the files "
                       "with --to-dir DIR)")
    return hf.HfApi()


def upload(api, folder: Path, repo_id: str, private: bool) -> str:
    """``create_repo`` (kept when it exists) and ``upload_folder``; a network or Hub failure becomes a HubError."""
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message="Upload with edgedistill push")
    except Exception as e:  # noqa: BLE001 - narrowed just below to the network's and the Hub's own errors
        if not (isinstance(e, OSError) or type(e).__module__.split(".")[0] in NETWORK_MODULES):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        raise HubError(f"could not upload to {repo_id}: {type(e).__name__}: {message}") from e
    return str(url)


def upload_layout(path: Path) -> dict:
    """Path in the repository -> local file, after rewriting the card(s) from the current files."""
    from .runtime.run import verify_files

    if (path / "manifest.json").is_file():
        verify_files(path, read_json(path / "manifest.json"))
        write_bundle_card(path)
        return bundle_files(path)
    if (exported_dir(path) / "student" / "model.pt").is_file():
        for bundle in bundle_folders(exported_dir(path)):
            verify_files(bundle, read_json(bundle / "manifest.json"))
        write_run_cards(path)
        return run_files(path)
    raise FileNotFoundError(f"{path} is neither a bundle (manifest.json) nor a run folder (student/model.pt): "
                            "push takes RUN or RUN/export/<format>-<precision>")


def bundle_files(bundle: Path, prefix: str = "") -> dict:
    manifest = read_json(bundle / "manifest.json")
    names = ["README.md", "manifest.json", *manifest["files"], *(n for n in BENCH_FILES if (bundle / n).is_file())]
    return {prefix + name: bundle / name for name in dict.fromkeys(names)}


def run_files(run: Path) -> dict:
    exported = exported_dir(run)
    files = {"README.md": run / "README.md"}
    files.update({name: run / name for name in RUN_FILES if (run / name).is_file()})
    files.update({p.name: p for p in sorted(run.glob("confusion-*.png"))})
    files.update({name: exported / name for name in BENCH_FILES if (exported / name).is_file()})
    files["student/model.pt"] = exported / "student" / "model.pt"
    for bundle in bundle_folders(exported):
        files.update(bundle_files(bundle, f"export/{bundle.name}/"))
    return files


def write_layout(files: dict, dest: Path):
    """Copy ``files`` into ``dest`` (new or empty) whole or not at all: built beside it, then renamed into place."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"--to-dir {dest} exists and is not an empty folder; give a new or empty folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for rel, source in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, tmp / rel)
    if dest.exists():
        dest.rmdir()
    tmp.rename(dest)
