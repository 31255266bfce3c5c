"""Recipes: YAML loaded into frozen dataclasses, validated before any work starts.

A recipe names registered things and sets numbers. Unknown keys and unknown registry names fail at load time,
naming the key and suggesting the nearest valid one; nothing is ever auto-corrected.
"""
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml


class RecipeError(ValueError):
    """A recipe (or an override) is invalid; the message says which key and what would be valid."""


@dataclass(frozen=True)
class DataCfg:
    dataset: str = "imagefolder"        # a name in data.DATASETS
    root: str = ""                      # folder for imagefolder; download/cache folder for torchvision sets
    classes: tuple[str, ...] = ()       # class names; empty: the dataset's own
    prompt_names: dict = field(default_factory=dict)  # class -> name used in text prompts (e.g. "Abyssinian cat")
    superclass: str = ""                # e.g. "pet", used by "which is a type of {superclass}" prompts
    test_fraction: float = 0.2          # stratified held-out split when the dataset has no test split
    val_fraction: float = 0.0
    max_per_class: int = 0              # cap images per class (0: all)
    split_seed: int = 0
    image_size: int = 0                 # evaluation/training size for the student; 0: the student's default
    crop_pct: float = 0.0               # centre-crop fraction of every view, teacher's and student's; 0: the teacher's
    augment: str = "light"              # a name in data.AUGMENTS
    views: int = 1                      # fixed augmented views per image whose teacher outputs are cached
    mixup: float = 0.0                  # Mixup alpha on real images only (P1); 0 disables; needs the online teacher
    cutmix: float = 0.0                 # CutMix alpha on real images only (P3); with mixup too, each batch picks one
    num_workers: int = 0
    real_train: bool = True             # False: real train images are not trained on (P4 zero-shot: synthetic only)


@dataclass(frozen=True)
class TeacherCfg:
    name: str = "efficientnet-lite"     # a name in teachers.TEACHERS
    arch: str = ""                      # open_clip arch, timm model name, or lite0/lite2
    pretrained: str = ""                # open_clip tag or timm pretrained tag; "" for the teacher's default
    image_size: int = 0                 # 0: the model's own
    head: str = "linear"                # linear | mlp (probed), zeroshot (CLIP text head), native (model's own)
    n_cls_blocks: int = 1               # DINOv2: concatenate the CLS tokens of the last n blocks (P1)
    avgpool: bool = False               # DINOv2: also append the average of the last block's patch tokens
    pool: str = "avg"                   # timm/EfficientNet-Lite: avg, or avgmax (average and max pooled, concatenated)
    templates: tuple[str, ...] = ("a photo of a {c}.",)
    probe_epochs: int = 30
    probe_lr: float = 1e-3
    probe_weight_decay: float = 1e-4
    probe_batch_size: int = 256
    batch_size: int = 64                # feature extraction batch size
    width: int = 64                     # tiny test teachers only
    depth: int = 2                      # tiny test teachers only
    embed_dim: int = 64                 # tiny test teachers only


@dataclass(frozen=True)
class StudentCfg:
    name: str = "mobilenetv3_small_100"  # any timm model name
    pretrained: bool = False            # timm hub weights (needs internet on first use)
    weights: str = ""                   # offline weights shipped by a package, a name in students.WEIGHTS
    embed_dim: int = 0                  # projection size for feature losses; 0: the teacher's feature size
    drop_path: float = 0.0
    drop_rate: float = 0.0
    model_kwargs: dict = field(default_factory=dict)  # extra timm create_model arguments (tiny test students)


@dataclass(frozen=True)
class LossCfg:
    ce: float = 0.0                     # cross-entropy on real labels (task term)
    kd: float = 0.0                     # Hinton KD, T^2 KL(teacher || student) (P1/P3)
    hard_kd: float = 0.0                # CE against the teacher's argmax (P1 Table I)
    feature_l2: float = 0.0             # L2 between normalised embeddings (P4)
    align_uniform: float = 0.0          # alignment + uniformity with projectors (P2)
    temperature: float = 2.0
    label_smoothing: float = 0.0
    proj_dim: int = 128                 # projector size for align_uniform


@dataclass(frozen=True)
class TrainCfg:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    optimizer: str = "adamw"            # adamw | sgd
    momentum: float = 0.9
    schedule: str = "cosine"            # cosine | constant
    warmup_epochs: float = 0.0
    teacher: str = "cached"             # cached: teacher outputs of fixed views; online: teacher runs each batch
    real_fraction: float = 0.5          # share of real images in a batch when synthetic images exist (P1: 1:1)
    amp: bool = True                    # CUDA only
    channels_last: bool = True          # NHWC memory layout: faster convolutions on GPUs and oneDNN CPUs
    compile: bool = False
    grad_clip: float = 0.0
    seed: int = 0
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    eval_every: int = 0                 # top-1 on the validation split every N epochs into log.jsonl (0: never)


@dataclass(frozen=True)
class SynthCfg:
    generator: str = "tiny-sd"          # a name in data.synth.GENERATORS
    model_id: str = ""                  # hub id; "" for the generator's default
    images_per_class: int = 0
    times_train: float = 0.0            # alternatively n x the real train set (P1/P2)
    steps: int = 0                      # 0: the generator's default
    guidance: float = -1.0              # <0: the generator's default
    size: int = 0                       # 0: the generator's default
    negative_prompt: str = ""
    batch_size: int = 4
    templates: tuple[str, ...] = ("a photo of a {c}",)
    dimensions: dict = field(default_factory=dict)  # contextual dimension -> list of options (P4)
    weights: dict = field(default_factory=dict)     # prompt term weights, e.g. {class: 1.5, superclass: 1.2}
    mix: str = ""                       # "" | inter | intra: mix pairs of real images instead of text prompts (P1)
    dtype: str = "auto"                 # auto | float32 | float16 | bfloat16
    compile: bool = False
    vae_slicing: bool = True
    curate_min_score: float = 0.0       # drop images whose teacher probability for their class is below this
    curate_agree: bool = False          # drop images whose teacher top-1 is not their class
    curate_dedup: float = 0.0           # drop near-duplicates above this teacher-embedding cosine (0: off)
    curate_leakage: float = 0.0         # drop images above this cosine to any evaluation image (0: off)
    seed: int = 0                       # image seeds derive from (seed, class, index)
    lora_id: str = ""                   # hub id of a LoRA fused into the UNet; "" for the generator's default
    llm: str = ""                       # local causal LM (folder or cached hub id) that fills empty dimensions
    llm_options: int = 15               # options the LLM writes per dimension (P4: 15, or 30 for large sets)


@dataclass(frozen=True)
class EvalCfg:
    top_k: int = 5
    corruptions: tuple[str, ...] = ()   # names in robustness.CORRUPTIONS, or "default" / "all"; (): none
    severities: tuple[int, ...] = (1, 3, 5)
    corruption_images: int = 100        # held-out images (stratified prefix) used for the corruption report
    spurious: str = ""                  # "", patch or background: P4's spurious-cue probe (trains one more student)
    synthetic_holdout: float = 0.1      # share of kept synthetic images held out for the synthetic-to-real gap
    zero_shot: bool = False             # student scored through the teacher's text embeddings (CLIP-aligned)


@dataclass(frozen=True)
class ExportCfg:
    formats: tuple[str, ...] = ("onnx",)
    precision: tuple[str, ...] = ("fp32",)
    opset: int = 17
    dynamic_batch: bool = True
    simplify: bool = False
    calibration_images: int = 300
    int8_finetune_steps: int = 200      # INT8-aware fine-tuning, the ladder's last resort; 0: never
    selection_images: int = 200         # train images held back to choose INT8 attempts on, when the run has no val
    selection_margin: float = 0.01      # NNCF accuracy control runs only when no attempt reaches the gate + this
    parity_images: int = 0              # 0: the whole test split; N: its first N only (a quick look, recorded)
    min_agreement: float = 0.995
    min_agreement_int8: float = 0.97


@dataclass(frozen=True)
class BenchCfg:
    batch: tuple[int, ...] = (1,)
    threads: int = 0                    # 0: the runtime's default
    warmup: int = 10
    iters: int = 50
    backends: tuple[str, ...] = ()      # (): every backend present


@dataclass(frozen=True)
class Recipe:
    name: str = "unnamed"
    description: str = ""
    data: DataCfg = field(default_factory=DataCfg)
    teacher: TeacherCfg = field(default_factory=TeacherCfg)
    student: StudentCfg = field(default_factory=StudentCfg)
    loss: LossCfg = field(default_factory=LossCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    baseline: bool = True               # also train the same student CE-only with the same budget
    synthetic: typing.Optional[SynthCfg] = None
    eval: EvalCfg = field(default_factory=EvalCfg)
    export: typing.Optional[ExportCfg] = None
    bench: typing.Optional[BenchCfg] = None

    def to_dict(self) -> dict:
        return to_plain(self)


# ---------------------------------------------------------------------------------------------------------------
# Loading


def builtin_recipes() -> dict[str, Path]:
    """Name -> path of every recipe shipped in the package."""
    try:
        root = resources.files("edgedistill.recipes")
        paths = [Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")]
    except (ModuleNotFoundError, FileNotFoundError):
        paths = []
    if not paths:  # running from a source checkout that is not installed
        paths = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))
    return {p.stem: p for p in sorted(paths)}


def load_recipe(name_or_path, overrides=(), check_names: bool = True) -> Recipe:
    """Load a built-in recipe by name, or a YAML file by path, apply ``key=value`` overrides and validate."""
    path = resolve_recipe_path(name_or_path)
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise RecipeError(f"Recipe {path} must be a mapping at the top level, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    recipe = build(Recipe, raw, "")
    check_values(recipe)
    if check_names:
        check_registered_names(recipe)
    return recipe


def resolve_recipe_path(name_or_path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise RecipeError(f"Recipe file {path} does not exist")
        return path
    known = builtin_recipes()
    if str(name_or_path) not in known:
        close = difflib.get_close_matches(str(name_or_path), known, n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise RecipeError(f"Unknown recipe {str(name_or_path)!r}.{hint} Built-in: {sorted(known)}")
    return known[str(name_or_path)]


def apply_override(raw: dict, item: str):
    """Apply one dotted ``key=value`` override to the raw mapping; the value is parsed as YAML."""
    if "=" not in item:
        raise RecipeError(f"Override {item!r} must look like key=value, e.g. train.epochs=3")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node, cls = raw, Recipe
    for depth, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(cls)}
        dotted = ".".join(parts[: depth + 1])
        if part not in names:
            raise RecipeError(unknown_key_message(dotted, part, names, prefix=".".join(parts[:depth])))
        if depth == len(parts) - 1:
            node[part] = yaml.safe_load(value)
            return
        sub = section_type(names[part].type)
        if sub is None:
            raise RecipeError(f"Override key {key!r}: {dotted!r} is a value, not a section")
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node, cls = node[part], sub


def unknown_key_message(dotted: str, part: str, names, prefix: str) -> str:
    close = difflib.get_close_matches(part, list(names), n=3, cutoff=0.5)
    where = f"in section {prefix!r}" if prefix else "at the top level"
    hint = ""
    if close:
        full = [f"{prefix}.{c}" if prefix else c for c in close]
        hint = f" Did you mean {full[0]!r}?" if len(full) == 1 else f" Did you mean one of {full}?"
    return f"Unknown recipe key {dotted!r} {where}.{hint} Valid keys: {sorted(names)}"


def section_type(tp):
    """The dataclass behind a field type (unwrapping Optional), or None for a plain value."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def build(cls, raw, prefix: str):
    """Recursively turn a mapping into dataclass ``cls``, refusing unknown keys and wrong types."""
    if not isinstance(raw, dict):
        raise RecipeError(f"Recipe section {prefix or 'top level'!r} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise RecipeError(unknown_key_message(dotted, str(key), names, prefix))
        kwargs[key] = coerce(hints[key], value, dotted)
    return cls(**kwargs)


def coerce(tp, value, dotted: str):
    sub = section_type(tp)
    if sub is not None:
        if value is None and type(None) in typing.get_args(tp):
            return None
        return build(sub, value if value is not None else {}, dotted)
    origin = typing.get_origin(tp)
    if origin is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]
        (inner, _) = typing.get_args(tp)
        return tuple(coerce(inner, v, dotted) for v in items)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"Recipe key {dotted!r} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"Recipe key {dotted!r} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"Recipe key {dotted!r} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"Recipe key {dotted!r} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise RecipeError(f"Recipe key {dotted!r} must be a string, got {value!r}")
        return str(value)
    return value


CHOICES = {
    "teacher.head": ("linear", "mlp", "zeroshot", "native"),
    "teacher.pool": ("avg", "avgmax"),
    "train.optimizer": ("adamw", "sgd"),
    "train.schedule": ("cosine", "constant"),
    "train.teacher": ("cached", "online"),
    "synthetic.mix": ("", "inter", "intra"),
    "eval.spurious": ("", "patch", "background"),
    "synthetic.dtype": ("auto", "float32", "float16", "bfloat16"),
}


def check_values(recipe: Recipe):
    """Range and choice checks that need no registry."""
    for dotted, allowed in CHOICES.items():
        section, key = dotted.split(".")
        sec = getattr(recipe, section)
        if sec is not None and getattr(sec, key) not in allowed:
            value = getattr(sec, key)
            close = difflib.get_close_matches(str(value), allowed, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise RecipeError(f"Recipe key {dotted!r} is {value!r}.{hint} Allowed: {list(allowed)}")
    positive = {"train.epochs": recipe.train.epochs, "train.batch_size": recipe.train.batch_size,
                "data.views": recipe.data.views}
    for dotted, value in positive.items():
        if value < 1:
            raise RecipeError(f"Recipe key {dotted!r} must be at least 1, got {value}")
    if not 0 <= recipe.data.test_fraction < 1:
        raise RecipeError(f"Recipe key 'data.test_fraction' must be in [0, 1), got {recipe.data.test_fraction}")
    loss = recipe.loss
    if not any((loss.ce, loss.kd, loss.hard_kd, loss.feature_l2, loss.align_uniform)):
        raise RecipeError("Recipe section 'loss' sets no loss weight: set at least one of ce, kd, hard_kd, "
                          "feature_l2, align_uniform")


def check_registered_names(recipe: Recipe):
    """Every registered name the recipe uses exists, so a typo never costs a download or a GPU hour."""
    from .data import AUGMENTS, DATASETS
    from .students import WEIGHTS, check_timm_name
    from .teachers import TEACHERS

    pairs = [("teacher.name", recipe.teacher.name, TEACHERS), ("data.dataset", recipe.data.dataset, DATASETS),
             ("data.augment", recipe.data.augment, AUGMENTS)]
    if recipe.student.weights:
        pairs.append(("student.weights", recipe.student.weights, WEIGHTS))
    if recipe.synthetic is not None:
        from .data.synth import GENERATORS, check_synth

        pairs.append(("synthetic.generator", recipe.synthetic.generator, GENERATORS))
        if recipe.synthetic.generator in GENERATORS:
            check_synth(recipe)
    for dotted, name, registry in pairs:
        if name not in registry:
            raise RecipeError(f"Recipe key {dotted!r}: {registry.unknown_message(name)}")
    check_timm_name("student.name", recipe.student.name)
    if recipe.export is not None:
        from .export import check_export_request

        check_export_request(recipe.export.formats, recipe.export.precision)


def to_plain(obj):
    """Dataclasses -> plain dicts/lists, for YAML/JSON output and fingerprints."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
