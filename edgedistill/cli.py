"""The only place that parses argv. ``main(argv) -> int`` is callable from tests.

Each verb imports its implementation inside its handler, so ``edgedistill --help`` stays light.

Exit codes: 0 done; 2 a problem the user can fix (a bad recipe, key or data folder, missing weights or backend, a
refused file), stated in one line; 1 an unexpected error, one line naming its type (``-v`` adds the traceback);
130 interrupted.
"""
import argparse
import logging
import re
import sys
import traceback
from pathlib import Path

RESUMABLE = {"run", "sweep", "synth"}  # verbs whose finished stages a re-run reuses
KNOWN_ERRORS = (("recipe", "RecipeError"), ("data", "DataError"), ("teachers", "WeightsUnavailable"),
                ("export", "ExportError"), ("runtime.run", "BundleError"),
                ("hub", "HubError"))  # (module, exception) exit 2


def _recipe_list(args):
    import yaml

    from .recipe import builtin_recipes

    recipes = builtin_recipes()
    width = max(map(len, recipes), default=0)
    for name, path in recipes.items():
        desc = (yaml.safe_load(path.read_text()) or {}).get("description", "")
        print(f"{name:<{width}}  {desc}")
    return 0


def _recipe_show(args):
    from .checks import section_presets
    from .recipe import dump_recipe, load_recipe

    print(dump_recipe(load_recipe(args.name, args.overrides, section_presets())), end="")
    return 0


def _recipe_run(args):
    from .checks import load_checked
    from .pipeline import run_recipe

    recipe = load_checked(args.name, args.overrides)
    run_recipe(recipe, args.out, seeds=args.seeds)
    return 0


def _recipe_sweep(args):
    from .sweep import run_sweep

    run_sweep(args.name, args.overrides, args.out, seeds=args.seeds)
    return 0


def _synth(args):
    from .checks import load_checked
    from .data.generation import run_synth

    recipe = load_checked(args.name, args.overrides)
    run_synth(recipe, args.out, shard=args.shard)
    return 0


def _weights_fetch(args):
    from .checks import load_checked
    from .weights import fetch
    from .weights_pack import fetch_into

    recipe = load_checked(args.name, args.overrides)
    if args.to is None:
        fetch(recipe)
    else:
        fetch_into(recipe, args.to)
    return 0


def _weights_pack(args):
    from .checks import load_checked
    from .weights_pack import pack

    pack(load_checked(args.name, args.overrides), args.tar)
    return 0


def _weights_unpack(args):
    from .weights_pack import unpack

    unpack(args.tar, args.dir)
    return 0


def _export(args):
    from .export import export_run

    export_run(args.run_dir, formats=_csv(args.formats), precisions=_csv(args.precision))
    return 0


def _bench(args):
    from .bench import bench_paths

    bench_paths(args.paths, batches=[int(b) for b in _csv(args.batch)], threads=args.threads,
                warmup=args.warmup, iters=args.iters)
    return 0


def _demo(args):
    from .utils import require

    require("gradio", "demo")
    from .demo.app import launch

    launch(args.path, host=args.host, port=args.port, share=args.share)
    return 0


def _push(args):
    from .hub import push

    print(push(args.path, args.repo_id, private=args.private, to_dir=args.to_dir))
    return 0


def _doctor(args):
    from .doctor import report

    print(report())
    return 0


def _csv(value):
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def add_weights_parser(verbs):
    """``edgedistill weights fetch|pack|unpack``."""
    weights = verbs.add_parser("weights", help="fetch, pack and unpack the weights a recipe needs (air-gapped sites)")
    wv = weights.add_subparsers(dest="action", required=True, metavar="ACTION")
    fetch = wv.add_parser("fetch", help="download every weight a recipe needs into the Hugging Face cache")
    fetch.add_argument("name", help="built-in recipe name or path to a YAML file")
    fetch.add_argument("overrides", nargs="*", metavar="key=value")
    fetch.add_argument("--to", default=None, metavar="DIR",
                       help="also copy them into DIR with weights.json and a recipe.yaml pointing at them")
    fetch.set_defaults(fn=_weights_fetch)
    pack = wv.add_parser("pack", help="one tar of a recipe's weights, sha256 per file, for an air-gapped machine")
    pack.add_argument("name", help="built-in recipe name or path to a YAML file")
    pack.add_argument("tar", metavar="OUT.tar")
    pack.add_argument("overrides", nargs="*", metavar="key=value")
    pack.set_defaults(fn=_weights_pack)
    unpack = wv.add_parser("unpack", help="check a pack's sha256s, extract it and write DIR/recipe.yaml")
    unpack.add_argument("tar", metavar="PACK.tar")
    unpack.add_argument("dir", metavar="DIR")
    unpack.set_defaults(fn=_weights_unpack)


def add_push_parser(verbs):
    """``edgedistill push RUN_OR_BUNDLE REPO_ID [--private] [--to-dir DIR]``."""
    push = verbs.add_parser("push", help="upload a bundle, or a run's student with its bundles, and its model card "
                            "to a Hugging Face Hub model repo")
    push.add_argument("path", metavar="RUN_OR_BUNDLE")
    push.add_argument("repo_id", metavar="REPO_ID", help="owner/name of the Hub model repository (created if absent)")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--to-dir", default=None, metavar="DIR",
                      help="write the files into DIR exactly as they would lie in the repo, instead of uploading")
    push.set_defaults(fn=_push)


def add_recipe_parsers(verbs):
    recipe = verbs.add_parser("recipe", help="list, show, run or sweep recipes")
    rv = recipe.add_subparsers(dest="action", required=True, metavar="ACTION")
    rv.add_parser("list", help="list the built-in recipes").set_defaults(fn=_recipe_list)
    show = rv.add_parser("show", help="print a recipe with every default filled in")
    show.add_argument("name", help="built-in recipe name or path to a YAML file")
    show.add_argument("overrides", nargs="*", metavar="key=value")
    show.set_defaults(fn=_recipe_show)
    run = rv.add_parser("run", help="run a recipe end to end (finished stages are reused)")
    run.add_argument("name", help="built-in recipe name or path to a YAML file")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.epochs=3")
    run.add_argument("--out", default=None, help="run folder (default: runs/<recipe name>)")
    run.add_argument("--seeds", type=int, default=1,
                     help="train with N seeds and report the mean and its 95%% Student-t interval")
    run.set_defaults(fn=_recipe_run)
    sweep = rv.add_parser("sweep", help="run a recipe over a grid, e.g. student.name=a,b export.precision=fp32,int8")
    sweep.add_argument("name")
    sweep.add_argument("overrides", nargs="*", metavar="key=v1,v2")
    sweep.add_argument("--out", default=None)
    sweep.add_argument("--seeds", type=int, default=1,
                       help="train each point with N seeds; sweep.md gives mean and 95%% Student-t interval")
    sweep.set_defaults(fn=_recipe_sweep)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgedistill", description="Distil a large pretrained vision model into a small, "
                                "fast, domain-specific student for an edge device.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, and the traceback of any error")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    add_recipe_parsers(verbs)

    synth = verbs.add_parser("synth", help="generate (or mix) synthetic training images for a recipe")
    synth.add_argument("name")
    synth.add_argument("overrides", nargs="*", metavar="key=value")
    synth.add_argument("--out", default=None, help="run folder (default: runs/<recipe name>)")
    synth.add_argument("--shard", default=None, help="i/n: make only this shard of the images")
    synth.set_defaults(fn=_synth)
    add_weights_parser(verbs)

    export = verbs.add_parser("export", help="export a trained student (ONNX, OpenVINO, TensorRT) with a parity check")
    export.add_argument("run_dir")
    export.add_argument("--formats", default=None, help="comma list, e.g. onnx,openvino,tensorrt")
    export.add_argument("--precision", default=None, help="comma list, e.g. fp32,fp16,int8")
    export.set_defaults(fn=_export)

    bench = verbs.add_parser("bench", help="measure latency and throughput of a run's student and bundles")
    bench.add_argument("paths", nargs="+", metavar="RUN_OR_BUNDLE")
    bench.add_argument("--batch", default="1", help="comma list of batch sizes")
    bench.add_argument("--threads", type=int, default=0, help="CPU threads (0: runtime default)")
    bench.add_argument("--warmup", type=int, default=10)
    bench.add_argument("--iters", type=int, default=50)
    bench.set_defaults(fn=_bench)

    add_push_parser(verbs)

    verbs.add_parser("doctor", help="optional backends, the host's CPU/GPU, and which recipes run here offline"
                     ).set_defaults(fn=_doctor)

    demo = verbs.add_parser("demo", help="serve a Gradio page to try the student (and teacher) on images")
    demo.add_argument("path", metavar="RUN_DIR_OR_BUNDLE")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=7860)
    demo.add_argument("--share", action="store_true", help="ask Gradio for a public share link")
    demo.set_defaults(fn=_demo)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    # Overrides may come after options (`run NAME --out D k=v`); argparse leaves those over, so collect them here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        if getattr(args, "out", None):
            check_out_folder(Path(args.out))
        return args.fn(args) or 0
    except KeyboardInterrupt:
        resume = "; re-run the same command to resume" if getattr(args, "action", args.verb) in RESUMABLE else ""
        print(f"edgedistill: interrupted{resume}", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place every error becomes a line and an exit code
        return report(e, args.verbose)


def check_out_folder(out: Path):
    """``--out`` must be a folder or not exist yet, and so must the nearest part of it that exists."""
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing == out and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a folder; give a new or existing folder")
    if existing is not None and not existing.is_dir():
        raise NotADirectoryError(f"--out {out} cannot be made: {existing} is a file, not a folder")


def report(e: Exception, verbose: bool) -> int:
    """Print ``e`` as one line on stderr (after its traceback when ``verbose``); return the exit code."""
    if verbose:
        traceback.print_exception(e, file=sys.stderr)
    if is_user_error(e):
        print(f"edgedistill: error: {user_message(e)}", file=sys.stderr)
        return 2
    hint = "" if verbose else " (run with -v for the traceback)"
    message = one_line(str(e))
    print(f"edgedistill: error: {type(e).__name__}{': ' + message if message else ''}{hint}", file=sys.stderr)
    return 1


def user_error_types() -> tuple:
    """What a user can fix from the message alone; anything else is a bug and is reported with its type."""
    import pickle

    known = [FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
             pickle.UnpicklingError]
    # Looked up, not imported: an error of a module that was never imported cannot have been raised, and a module
    # that fails to import must not turn this report into a traceback.
    for module, name in KNOWN_ERRORS:
        cls = getattr(sys.modules.get(f"{__package__}.{module}"), name, None)
        if cls is not None:
            known.append(cls)
    return tuple(known)


def is_user_error(e: Exception) -> bool:
    # An optional backend that is not installed says which `pip install` fixes it; any other ImportError is a bug.
    if isinstance(e, ImportError):
        return "pip install" in str(e)
    return isinstance(e, user_error_types())


def user_message(e: Exception) -> str:
    import pickle

    return unpickling_message(str(e)) if isinstance(e, pickle.UnpicklingError) else one_line(str(e))


def unpickling_message(text: str) -> str:
    """torch.load(weights_only=True)'s refusal, without its advice to turn weights_only off (running the
    file's code) or to allowlist the global: neither is ever the way out here."""
    head, torch_said, _ = text.partition("Weights only load failed")
    file = head.strip(" :") if torch_said else ""  # a loader that re-raises may put the path first
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return (f"refused to load {file or 'a file'}: it carries pickled code or objects ({found.group(1)}); "
                "edgedistill reads run folders as tensors and plain data only. Re-create the run folder with "
                "`edgedistill recipe run`.")
    reason = one_line(text.split("WeightsUnpickler error:")[-1].split("Check the documentation")[0])
    return f"{file or 'a file'} is damaged or was not written by edgedistill (torch.load: {reason})"


def one_line(text: str) -> str:
    """Newlines, tabs and terminal colour codes collapsed: an error is one line."""
    return " ".join(re.sub(r"\x1b\[[0-9;]*m", "", text).split())


if __name__ == "__main__":
    sys.exit(main())
