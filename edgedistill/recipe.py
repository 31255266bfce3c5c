"""Recipes: the schema, YAML loading, overrides and every check that needs no registry.

This is the leaf every module imports, so it imports nothing from edgedistill but ``recipe_types`` (type coercion,
itself a leaf). It holds the frozen dataclasses (each numeric field declares its valid range beside it with ``num``),
loading (a built-in name or a YAML file, then dotted ``key=value`` overrides), and the value checks: ranges,
choices, prompt templates. Every problem is a ``RecipeError`` naming the dotted key and what would be valid; unknown
keys get the nearest one suggested, never auto-corrected. Checking that the registered names a recipe uses exist
needs the registries: ``checks.load_checked``.
"""
import dataclasses
import difflib
import math
import operator
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

# RecipeError and build are imported from here by the rest of the package.
from .recipe_types import RecipeError, build, expand_presets, section_type, unknown_key_message  # noqa: F401

SEED_MAX = 2**32 - 1  # seeds are 32-bit: every RNG the pipeline seeds takes them (np.random.seed needs < 2**32)
BOUNDS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


def num(default, *, ge=None, gt=None, le=None, lt=None, added: bool = False):
    """A numeric field (or tuple of numbers) and its valid range: ``num(1e-3, gt=0)``; ``added``: see fingerprinted."""
    bounds = {op: v for op, v in zip(BOUNDS, (ge, gt, le, lt)) if v is not None}
    return field(default=default, metadata={"range": bounds, "added": added})


def one_of(*choices: str, added: bool = False):
    """A text field that must be one of ``choices``; the first is the default. ``added``: see fingerprinted."""
    return field(default=choices[0], metadata={"choices": choices, "added": added})


def any_of(*choices: str, logging_only: bool = False):
    """A list of texts, each one of ``choices``; empty by default. ``logging_only``: it changes what is logged,
    never what is computed, so stage fingerprints leave it out (``fingerprinted``)."""
    return field(default=(), metadata={"choices": choices, "logging_only": logging_only})


@dataclass(frozen=True)
class DataCfg:
    dataset: str = "imagefolder"        # a name in data.DATASETS, torchvision/<Class> or hf/<Hugging Face id>
    root: str = ""                      # folder for imagefolder; download/cache folder for torchvision and hf sets
    classes: tuple[str, ...] = ()       # class names; empty: the dataset's own
    prompt_names: dict[str, str] = field(default_factory=dict)  # class -> name in text prompts ("Abyssinian cat")
    superclass: str = ""                # e.g. "pet", used by "which is a type of {superclass}" prompts
    test_fraction: float = num(0.2, ge=0, lt=1)  # stratified held-out split when the dataset has no test split
    val_fraction: float = num(0.0, ge=0, lt=1)  # of what the test split leaves
    max_per_class: int = num(0, ge=0)   # cap images per class (0: all)
    split_seed: int = num(0, ge=0, le=SEED_MAX)
    image_size: int = num(0, ge=0)      # evaluation/training size for the student; 0: the student's default
    crop_pct: float = num(0.0, ge=0, le=1)  # centre-crop fraction of every view, teacher's and student's; 0: teacher's
    augment: str = "light"              # a name in data.AUGMENTS
    views: int = num(1, ge=1)           # fixed augmented views per image whose teacher outputs are cached
    # Noisy Student (Xie et al. 2020): a fresh augmentation (in data.AUGMENTS) of the student's input each epoch on
    # top of the cached view, whose teacher target it keeps: only for label-keeping ones (flips, turns); "": none.
    student_augment: str = ""
    mixup: float = num(0.0, ge=0)       # Mixup alpha on real images only (P1); 0 disables; needs the online teacher
    cutmix: float = num(0.0, ge=0)      # CutMix alpha on real images only (P3); with mixup too, each batch picks one
    num_workers: int = num(0, ge=0)
    labels_per_class: int = num(0, ge=0)  # keep N labels per class; the other training images are unlabelled (0: all)
    unlabelled_root: str = ""           # a folder of unlabelled images (any layout), for the distillation terms only
    real_train: bool = True             # False: real train images are not trained on (P4 zero-shot: synthetic only)
    hf_config: str = ""                 # hf/<id>: the dataset's configuration (subset); "": its default
    hf_split: str = "train"             # hf/<id>: the split trained on (data.val_fraction is carved from it)
    hf_test_split: str = "test"         # hf/<id>: the held-out split; "": data.test_fraction of hf_split instead
    hf_image_column: str = ""           # hf/<id>: "": the dataset's one Image column
    hf_label_column: str = ""           # hf/<id>: "": its one ClassLabel column (whose names are the class names)


@dataclass(frozen=True)
class TeacherCfg:
    name: str = "efficientnet-lite"     # a name in teachers.TEACHERS
    arch: str = ""                      # open_clip arch, timm model name, or lite0/lite2
    pretrained: str = ""                # open_clip tag or timm pretrained tag; "" for the teacher's default
    weights: str = ""                   # local weights instead of the hub's: open_clip file/folder or timm file
    image_size: int = num(0, ge=0)      # 0: the model's own
    head: str = one_of("linear", "mlp", "zeroshot", "native")  # linear/mlp probed, zeroshot (text head), native
    mode: str = one_of("probe", "finetune")  # finetune: encoder and linear/mlp head trained end to end on the labels
    finetune_epochs: int = num(10, ge=1)
    finetune_lr: float = num(1e-3, gt=0)  # AdamW; on the quickstart data 1.5e-3 converged, 1e-4 did not
    finetune_batch_size: int = num(16, ge=1)
    finetune_freeze_stages: int = num(0, ge=0, added=True)  # as student.freeze_stages, for a fine-tuned timm teacher
    runtime: str = one_of("auto", "pytorch", "onnxruntime", "openvino")  # what runs the feature pass (auto: fastest)
    n_cls_blocks: int = num(1, ge=1)    # DINOv2: concatenate the CLS tokens of the last n blocks (P1)
    avgpool: bool = False               # DINOv2: also append the average of the last block's patch tokens
    pool: str = one_of("avg", "avgmax")  # timm/EfficientNet-Lite: avgmax concatenates average and max pooling
    templates: tuple[str, ...] = ("a photo of a {c}.",)  # zeroshot head: may use {c} and {superclass}
    probe_epochs: int = num(30, ge=1)
    probe_lr: float = num(1e-3, gt=0)
    probe_weight_decay: float = num(1e-4, ge=0)
    probe_batch_size: int = num(256, ge=1)
    batch_size: int = num(64, ge=1)     # feature extraction batch size
    width: int = num(64, ge=1)          # tiny test teachers only
    depth: int = num(2, ge=1)           # tiny test teachers only
    embed_dim: int = num(64, ge=1)      # tiny test teachers only


@dataclass(frozen=True)
class StudentCfg:
    name: str = "mobilenetv3_small_100"  # any timm model name
    pretrained: bool = False            # timm hub weights (needs internet on first use)
    packaged_weights: str = ""          # offline weights a package ships: a name in packaged_weights.PACKAGED_WEIGHTS
    weights: str = ""                   # a local timm state dict file (.safetensors/.pth) instead of hub weights
    # Start from an earlier run's student (backbone, projection head): its run folder, its model.pt, or recipe:NAME,
    # that recipe run (or reused) first into RUN/init/<its name> (P4's two stages). "": no such start.
    init_from: str = ""
    embed_dim: int = num(0, ge=0)       # projection size for feature losses; 0: the teacher's feature size
    drop_path: float = num(0.0, ge=0, lt=1)
    drop_rate: float = num(0.0, ge=0, lt=1)
    pool: str = one_of("avg", "avgmax")  # avgmax: average and max pooling concatenated, as teacher.pool
    freeze_stages: int = num(0, ge=0, added=True)  # stem + first N timm stages keep their weights and BN statistics
    # The student's resize filter, in training, evaluation and every export ("": its timm data config's). PIL's
    # bicubic, bilinear and lanczos average away detail finer than a pixel of the output; nearest keeps it, aliased.
    interpolation: str = one_of("", "bicubic", "bilinear", "lanczos", "nearest", added=True)
    model_kwargs: dict[str, typing.Any] = field(default_factory=dict)  # extra timm create_model arguments


def weight():
    """A loss weight (>= 0; 0, the default, is off): ``loss.<name>`` selects the loss registered as <name>."""
    return field(default=0.0, metadata={"range": {">=": 0}, "weight": True})


@dataclass(frozen=True)
class LossCfg:
    ce: float = weight()                # cross-entropy on real labels (task term)
    kd: float = weight()                # Hinton KD, T^2 KL(teacher || student) (P1/P3)
    hard_kd: float = weight()           # CE against the teacher's argmax (P1 Table I)
    feature_l2: float = weight()        # L2 between normalised embeddings (P4)
    align_uniform: float = weight()     # alignment + uniformity with projectors (P2)
    dkd: float = weight()               # decoupled KD: dkd_alpha * TCKD + dkd_beta * NCKD at `temperature` (P1, P3)
    dist: float = weight()              # DIST: Pearson inter- and intra-class relations (P3)
    bkl: float = weight()               # binary KL, sigmoid student against softmax teacher (P3 Eq. 3)
    bce: float = weight()               # BCE label loss on real labels (P3 Table 4, as RSB)
    crd: float = weight()               # CRD: MLP projectors and a memory of negatives (P1/P2/P3)
    infonce: float = weight()           # InfoNCE between student and teacher projections (P2 Eq. 1)
    srrl: float = weight()              # student features -> connector -> teacher classifier (P2); linear/mlp head
    hint: float = weight()              # hint on an intermediate feature map, 1x1 adapter (P3 Eq. 2); online teacher
    contrastive: float = weight()       # image-image contrastive loss, learnable temperature (P4 App. A.7)
    clip_caption: float = weight()      # CLIP loss against class-caption text embeddings (P4); teacher.head zeroshot
    multi_positive: float = weight()    # multi-positive loss over class captions (P4 App. A.15); teacher.head zeroshot
    temperature: float = num(2.0, gt=0)  # kd and dkd
    label_smoothing: float = num(0.0, ge=0, lt=1)  # ce and bce
    # hard_kd: weight each image by the inverse count of its teacher class in the batch, so every class the teacher
    # sees in the batch counts equally (the batch-level counterpart of balanced accuracy)
    class_balance: bool = False
    proj_dim: int = num(128, ge=1)      # projector size for align_uniform, infonce and crd
    dkd_alpha: float = num(1.0, ge=0)   # TCKD weight (mdistiller: 1)
    dkd_beta: float = num(8.0, ge=0)    # NCKD weight (mdistiller: 8 on CIFAR, 0.5 on ImageNet)
    dist_beta: float = num(1.0, ge=0)   # inter-class relation weight
    dist_gamma: float = num(1.0, ge=0)  # intra-class relation weight
    dist_tau: float = num(1.0, gt=0)    # DIST's softmax temperature
    crd_negatives: int = num(4096, ge=1)  # memory slots drawn as negatives per image
    crd_tau: float = num(0.07, gt=0)
    crd_momentum: float = num(0.5, ge=0, lt=1)  # memory update: m <- momentum * m + (1 - momentum) * z
    infonce_tau: float = num(0.1, gt=0)
    hint_layer: str = ""                # student backbone module (e.g. blocks.3); "": its last stage (feature_info)
    hint_teacher_layer: str = ""        # module of the teacher's network; "": its last stage (feature_info)
    hint_norm: str = one_of("l2", "l1")
    contrastive_tau: float = num(0.07, gt=0)  # initial value; learnt
    clip_caption_tau: float = num(0.07, gt=0)  # initial value; learnt
    multi_positive_tau: float = num(0.1, gt=0)


@dataclass(frozen=True)
class TrainCfg:
    epochs: int = num(10, ge=1)
    batch_size: int = num(64, ge=1)
    lr: float = num(1e-3, gt=0)
    weight_decay: float = num(0.05, ge=0)
    optimizer: str = one_of("adamw", "sgd", "lamb")  # lamb: timm's LAMB, layer-wise trust ratio (P3, as RSB)
    momentum: float = num(0.9, ge=0, lt=1)
    schedule: str = one_of("cosine", "constant")
    warmup_epochs: float = num(0.0, ge=0)
    teacher: str = one_of("cached", "online")  # cached: teacher outputs of fixed views; online: runs each batch
    # Repeated augmentation (RSB/DeiT; P3: 3): each drawn image N times in the same batch, each a different view
    # (online: N fresh augmentations; cached: N distinct cached views, cycling when data.views < N). The
    # epoch keeps its length, as timm's RepeatAugSampler: it draws ~1/N of the distinct images. 1: off.
    repeated_aug: int = num(1, ge=1)
    real_fraction: float = num(0.5, gt=0, le=1)  # share of real images in a batch when synthetic images exist (P1: 1:1)
    amp: bool = True                    # CUDA only
    channels_last: bool = True          # NHWC memory layout: faster convolutions on GPUs and oneDNN CPUs
    compile: bool = False
    grad_clip: float = num(0.0, ge=0)   # max gradient norm; 0: off
    seed: int = num(0, ge=0, le=SEED_MAX)
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    eval_every: int = num(0, ge=0)      # top-1 on the validation split every N epochs into log.jsonl (0: never)
    log: tuple[str, ...] = any_of("tensorboard", logging_only=True)  # also log to RUN/<stage>/tb/ (TensorBoard)


@dataclass(frozen=True)
class SynthCfg:
    generator: str = "tiny-sd"          # a name in data.generators.GENERATORS
    model_id: str = ""                  # hub id; "" for the generator's default
    weights: str = ""                   # a local diffusers pipeline folder, loaded instead of model_id
    images_per_class: int = num(0, ge=0)  # set this or times_train (0: unset)
    times_train: float = num(0.0, ge=0)  # alternatively n x the real train set (P1/P2)
    steps: int = num(0, ge=0)           # 0: the generator's default
    guidance: float = num(-1.0)         # any finite number; < 0: the generator's default
    size: int = num(0, ge=0)            # 0: the generator's default; else a multiple of 8
    negative_prompt: str = ""
    batch_size: int = num(4, ge=1)
    templates: tuple[str, ...] = ("a photo of a {c}",)  # may use {c} and {superclass}
    dimensions: dict[str, list[str]] = field(default_factory=dict)  # contextual dimension -> its options (P4)
    # Prompt term weights, e.g. {class: 1.5, superclass: 1.2}: 1 keeps a term, 1.5 stresses it, 0.5 fades it.
    prompt_weights: dict[str, float] = field(default_factory=dict, metadata={"range": {">=": 0}})
    mix: str = one_of("", "inter", "intra")  # mix pairs of real images instead of text prompts (P1)
    dtype: str = one_of("auto", "float32", "float16", "bfloat16")
    compile: bool = False
    vae_slicing: bool = True
    curate_min_score: float = num(0.0, ge=0, le=1)  # drop images whose teacher class probability is below this
    curate_agree: bool = False          # drop images whose teacher top-1 is not their class
    curate_dedup: float = num(0.0, ge=0, le=1)  # drop near-duplicates above this teacher-embedding cosine (0: off)
    curate_leakage: float = num(0.0, ge=0, le=1)  # drop images above this cosine to any evaluation image (0: off)
    seed: int = num(0, ge=0, le=SEED_MAX)  # image seeds derive from (seed, class, index)
    lora_id: str = ""                   # hub id of a LoRA fused into the UNet; "" for the generator's default
    llm: str = ""                       # local causal LM (folder or cached hub id) that fills empty dimensions
    llm_options: int = num(15, ge=1)    # options the LLM writes per dimension (P4: 15, or 30 for large sets)


@dataclass(frozen=True)
class EvalCfg:
    top_k: int = num(5, ge=1)
    # Corruption names and severities live in edgedistill.corruptions (CORRUPTIONS, DEFAULT_SUBSET, SEVERITIES).
    corruptions: tuple[str, ...] = ()   # registered names, or "default" / "all" alone; (): none
    severities: tuple[int, ...] = num((1, 3, 5), ge=1, le=5)  # each in corruptions.SEVERITIES
    corruption_images: int = num(100, ge=1)  # held-out images (stratified prefix) used for the corruption report
    spurious: str = one_of("", "patch", "background")  # P4's spurious-cue probe (trains one more student)
    synthetic_holdout: float = num(0.1, ge=0, le=0.5)  # share of kept synthetic images held out (synthetic-to-real gap)
    zero_shot: bool = False             # student scored through the teacher's text embeddings (CLIP-aligned)
    student_probe: bool = False         # P4: linear probes of the student's features, real vs synthetic training images
    student_probe_epochs: int = num(200, ge=1)  # full-batch Adam steps, fixed up front
    student_probe_lr: tuple[float, ...] = num((1e-3, 1e-2, 1e-1), gt=0)  # the one scoring best on val is kept


@dataclass(frozen=True)
class ExportCfg:
    formats: tuple[str, ...] = ("onnx",)
    precision: tuple[str, ...] = ("fp32",)
    opset: int = num(17, ge=17)         # every format goes through ONNX, which needs >= 17 (export.onnx.MIN_OPSET)
    dynamic_batch: bool = True
    simplify: bool = False
    calibration_images: int = num(300, ge=1)
    int8_finetune_steps: int = num(200, ge=0)  # INT8-aware fine-tuning, the ladder's last resort; 0: never
    selection_images: int = num(200, ge=1)  # train images held back to choose INT8 attempts on, when the run has no val
    selection_margin: float = num(0.01, ge=0, le=1)  # NNCF accuracy control runs only if no attempt reaches gate+this
    parity_images: int = num(0, ge=0)   # 0: the whole test split; N: its first N only (a quick look, recorded)
    min_agreement: float = num(0.995, ge=0, le=1)
    min_agreement_int8: float = num(0.97, ge=0, le=1)


@dataclass(frozen=True)
class BenchCfg:
    batch: tuple[int, ...] = num((1,), ge=1)  # each batch size measured
    threads: int = num(0, ge=0)         # 0: the runtime's default
    warmup: int = num(10, ge=0)
    iters: int = num(50, ge=1)
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


def load_recipe(name_or_path, overrides=(), presets=None) -> Recipe:
    """Load a built-in recipe by name, or a YAML file by path, apply ``key=value`` overrides, coerce and check values.

    Registered names are not looked up here (that needs the registries): ``checks.load_checked`` adds that, and
    passes ``presets`` (section -> name -> mapping, ``checks.section_presets``): a section given as a name in the
    YAML or by an override (``loss=dkd``) is replaced by that mapping, so later overrides (``loss.temperature=8``)
    edit the preset.
    """
    path = resolve_recipe_path(name_or_path)
    raw = parse_yaml(path.read_text(), f"Recipe {path}") or {}
    if not isinstance(raw, dict):
        raise RecipeError(f"Recipe {path} must be a mapping at the top level, got {type(raw).__name__}")
    expand_presets(raw, presets or {})
    for item in overrides:
        apply_override(raw, item)
        expand_presets(raw, presets or {})
    recipe = build(Recipe, raw, "")
    check_values(recipe)
    return recipe


def parse_yaml(text: str, what: str):
    """``yaml.safe_load``; a syntax error becomes a RecipeError giving the 1-based line and column."""
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise RecipeError(f"{what} is not valid YAML: {where}{e.problem or e.context}") from e
    except (yaml.YAMLError, ValueError) as e:  # ValueError: PyYAML builds dates, so 2024-02-30 fails in datetime
        raise RecipeError(f"{what} is not valid YAML: {e}") from e


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
            node[part] = parse_yaml(value, f"Override {item!r}")
            return
        sub = section_type(names[part].type)
        if sub is None:
            raise RecipeError(f"Override key {key!r}: {dotted!r} is a value, not a section")
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node, cls = node[part], sub


# ---------------------------------------------------------------------------------------------------------------
# Values: ranges, choices and templates (checks.py checks the registered names)


def check_values(recipe: Recipe):
    """Every declared range and choice, the prompt templates, and that some loss is on."""
    check_fields(recipe, "")
    check_templates(recipe)
    weights = [f.name for f in dataclasses.fields(recipe.loss) if f.metadata.get("weight")]
    if not any(getattr(recipe.loss, name) for name in weights):
        raise RecipeError(f"Recipe section 'loss' sets no loss weight: set at least one of {', '.join(weights)}")


def check_fields(section, prefix: str):
    """Each field's declared ``one_of`` choices or ``num`` range, in this section and the ones below it."""
    for f in dataclasses.fields(section):
        value, dotted = getattr(section, f.name), f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(value):
            check_fields(value, dotted)
        elif "choices" in f.metadata:
            for v in value if isinstance(value, tuple) else (value,):  # any_of: every item is one of the choices
                if v not in f.metadata["choices"]:
                    close = difflib.get_close_matches(v, f.metadata["choices"], n=1)
                    hint = f" Did you mean {close[0]!r}?" if close else ""
                    raise RecipeError(f"Recipe key {dotted!r} is {value!r}.{hint} Allowed: "
                                      f"{list(f.metadata['choices'])}")
        elif "range" in f.metadata:
            check_range(dotted, value, f.metadata["range"])


def check_range(dotted: str, value, bounds: dict):
    """A number, every item of a tuple, or every value of a mapping (named ``key.item``) within ``bounds``."""
    if isinstance(value, dict):
        items = [(f"{dotted}.{k}", v) for k, v in value.items()]
    else:
        items = [(dotted, v) for v in (value if isinstance(value, tuple) else (value,))]
    for key, v in items:
        if not (isinstance(v, int) or math.isfinite(v)) or not all(BOUNDS[op](v, b) for op, b in bounds.items()):
            valid = " and ".join(f"{op} {b}" for op, b in bounds.items()) or "a finite number"
            raise RecipeError(f"Recipe key {key!r} must be {valid}, got {v!r}")


def check_templates(recipe: Recipe):
    """Prompt templates may use only {c} and {superclass}: a stray brace would otherwise fail after the downloads."""
    keys = {"teacher.templates": recipe.teacher.templates}
    if recipe.synthetic is not None:
        keys["synthetic.templates"] = recipe.synthetic.templates
    for dotted, templates in keys.items():
        if not templates and (dotted == "synthetic.templates" or recipe.teacher.head == "zeroshot"):
            raise RecipeError(f"Recipe key {dotted!r} is empty; e.g. ['a photo of a {{c}}']")
        for t in templates:
            try:
                t.format(c="x", superclass="y")
            except (KeyError, IndexError, ValueError, AttributeError, TypeError) as e:
                raise RecipeError(f"Recipe key {dotted!r}: template {t!r} may use only {{c}} and {{superclass}} "
                                  f"({type(e).__name__}: {e})") from e


def to_plain(obj):
    """Dataclasses -> plain dicts/lists, for YAML/JSON output and fingerprints."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def fingerprinted(section) -> dict:
    """``to_plain(section)`` less its ``logging_only`` fields and, at their default, its ``added`` ones (keys added
    after run folders existed: those folders still resume): what a stage's fingerprint depends on."""
    meta = {f.name: (f.metadata, f.default) for f in dataclasses.fields(section)}
    return {k: v for k, v in to_plain(section).items() if not meta[k][0].get("logging_only")
            and not (meta[k][0].get("added") and v == meta[k][1])}


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
