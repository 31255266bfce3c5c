"""Students: any timm backbone with a projection head (feature distillation) and/or a classifier head."""
import difflib
from pathlib import Path

import torch
from torch import nn

from .packaged_weights import load_packaged_weights
from .teachers import InputSpec, ZeroShotHead
from .teachers.timm_teachers import timm_input_spec

# student.packaged_weights also fixes the architecture: its timm name
PACKAGED_ARCH = {"efficientnet-lite0": "tf_efficientnet_lite0", "efficientnet-lite2": "tf_efficientnet_lite2"}
INIT_RECIPE = "recipe:"  # student.init_from: recipe:NAME, the earlier recipe whose student this one starts from


def check_timm_name(dotted: str, name: str):
    import timm

    from .recipe import RecipeError

    if name not in timm.list_models() and name.split(".")[0] not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise RecipeError(f"Recipe key {dotted!r}: {name!r} is not a timm model.{hint}")


class Student(nn.Module):
    """Backbone + optional ``proj`` (to the teacher's embedding) + optional ``classifier``.

    ``forward`` returns a dict: ``features`` (pooled backbone output), ``embedding`` (projected, when a projection
    head exists) and ``logits`` (from the classifier, or zero-shot through the class text embeddings).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, embed_dim: int = 0, classifier: bool = True,
                 zero_shot: ZeroShotHead | None = None):
        super().__init__()
        self.backbone = backbone
        # What the backbone returns with num_classes=0: after a pre-logits head (MobileNetV3's conv_head) that is
        # head_hidden_size, not num_features.
        F = getattr(backbone, "head_hidden_size", None) or backbone.num_features
        self.proj = nn.Linear(F, embed_dim) if embed_dim else None
        self.classifier = nn.Linear(F, num_classes) if classifier else None
        self.zero_shot = zero_shot  # losses' projectors live with the losses (objective.py), never in the student
        self.frozen: list[str] = []  # backbone modules kept in eval mode while training (freeze_stages)

    def train(self, mode: bool = True):
        super().train(mode)
        keep_in_eval(self.backbone, self.frozen)
        return self

    def forward(self, x, embedding: bool = True):
        """``embedding=False``: the projection is run only when the scores need it (zero-shot, no classifier)."""
        f = self.backbone(x)
        out = {"features": f}
        if self.proj is not None and (embedding or self.classifier is None):
            out["embedding"] = self.proj(f)
        if self.classifier is not None:
            out["logits"] = self.classifier(f)
        elif self.zero_shot is not None:
            out["logits"] = self.zero_shot(out["embedding"])
        return out


class LogitsOnly(nn.Module):
    """What gets exported: image -> class scores (or the embedding when the student has no classes). With a
    classifier, the projection head that only feature losses train through is not run (nor exported, nor counted)."""

    def __init__(self, student: Student):
        super().__init__()
        self.student = student

    def forward(self, x):
        out = self.student(x, embedding=False)
        return out["logits"] if "logits" in out else out["embedding"]


def set_pool(model: nn.Module, cfg) -> nn.Module:
    """``student.pool``: avgmax is timm's concatenated average and max pooling ahead of our own heads."""
    if cfg.pool == "avg":
        return model
    from .recipe import RecipeError

    try:
        model.reset_classifier(0, global_pool="catavgmax")
    except (TypeError, ValueError, NotImplementedError, AssertionError) as e:
        raise RecipeError(f"Recipe key 'student.pool': {cfg.name!r} cannot pool its feature map by {cfg.pool!r} "
                          f"({e}); use 'avg', or a student whose pooled features feed the classifier directly "
                          "(EfficientNet, ResNet)") from None
    if getattr(model, "head_hidden_size", 0) != 2 * model.num_features:  # the width Student sizes its heads by
        raise RecipeError(f"Recipe key 'student.pool': {cfg.name!r} does not pool through timm's selectable pooling, "
                          "so 'avgmax' cannot apply; use 'avg'")
    return model


def random_copy(cfg) -> nn.Module:
    """A randomly initialised backbone of the student's architecture, for checks made before any work."""
    import timm

    return timm.create_model(student_arch(cfg), pretrained=False, num_classes=0, **dict(cfg.model_kwargs))


def check_pool(cfg):
    """Refuse a ``student.pool`` the architecture cannot take before any work: tried on a randomly initialised copy."""
    set_pool(random_copy(cfg), cfg)


def stage_groups(model: nn.Module, n: int, key: str, what: str) -> tuple[dict, dict]:
    """timm's coarse layer groups of ``model``: ({ordinal: parameter names}, {ordinal: module names}); 0 is the
    stem. Refuses (naming the recipe ``key``) an ``n`` of stages to freeze that ``model`` cannot take."""
    from timm.models import group_modules, group_parameters

    from .recipe import RecipeError

    try:
        matcher = model.group_matcher(coarse=True)
    except (AttributeError, NotImplementedError):
        raise RecipeError(f"Recipe key {key!r}: {what} does not name its stages to timm (no group_matcher); "
                          "use 0") from None
    params, modules = group_parameters(model, matcher), group_modules(model, matcher)
    if n > len(params) - 2:
        raise RecipeError(f"Recipe key {key!r}: {what} has a stem and {len(params) - 1} stages, and its last stage "
                          f"must train: use 0 to {len(params) - 2}, not {n}")
    return params, modules


def freeze_first_stages(model: nn.Module, n: int, key: str, what: str) -> list[str]:
    """Stop the stem and the first ``n`` stages of a timm ``model`` training (``requires_grad`` off); returns the
    names of their modules, which the caller keeps in eval mode so their BatchNorm statistics stay as they were."""
    if not n:
        return []
    params, modules = stage_groups(model, n, key, what)
    frozen = {name for g in range(n + 1) for name in params[g]}
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    return [m for g in range(n + 1) for m in modules[g]]


def keep_in_eval(model: nn.Module, names: list[str]):
    """After ``train()``: the frozen stages' modules back in eval mode, so their BatchNorm statistics stay put."""
    for name in names:
        model.get_submodule(name).eval()


def freeze_stages(student: Student, cfg) -> Student:
    """``student.freeze_stages``: the stem and the first N stages stop training (no gradient, BatchNorm statistics
    kept). Applied to a student about to train, never to one loaded for evaluation or export."""
    student.frozen = freeze_first_stages(student.backbone, cfg.freeze_stages, "student.freeze_stages", repr(cfg.name))
    return student


def check_freeze(cfg):
    """Refuse a ``student.freeze_stages`` the architecture cannot take before any work (on a random copy)."""
    stage_groups(random_copy(cfg), cfg.freeze_stages, "student.freeze_stages", repr(cfg.name))


def check_teacher_freeze(t):
    """Refuse a ``teacher.finetune_freeze_stages`` before any work: it needs a fine-tuned timm teacher whose stages
    it can take (tried on a randomly initialised copy of the architecture)."""
    import timm

    from .recipe import RecipeError
    from .teachers.timm_teachers import timm_name

    key = "teacher.finetune_freeze_stages"
    if t.mode != "finetune":
        raise RecipeError(f"Recipe key {key!r} applies only with teacher.mode: finetune (it is {t.mode!r}); use 0")
    if t.name not in ("timm", "efficientnet-lite"):
        raise RecipeError(f"Recipe key {key!r} needs a timm teacher (timm, efficientnet-lite), not {t.name!r}; use 0")
    arch = timm_name(t).split(".")[0]
    stage_groups(timm.create_model(arch, pretrained=False, num_classes=0), t.finetune_freeze_stages, key,
                 f"teacher {arch!r}")


def create_backbone(cfg) -> nn.Module:
    return set_pool(_create_backbone(cfg), cfg)


def _create_backbone(cfg) -> nn.Module:
    import timm

    from .teachers.timm_teachers import create_timm

    kwargs = dict(cfg.model_kwargs)
    if cfg.drop_path:
        kwargs["drop_path_rate"] = cfg.drop_path
    if cfg.packaged_weights:
        model = load_packaged_weights(cfg.packaged_weights)
        model.reset_classifier(0)
        return model
    if cfg.pretrained or cfg.weights:  # student.weights: a local state dict file, loaded as timm loads hub weights
        return create_timm(cfg.name, True, f"Student {cfg.name!r}", cfg.weights, "student.weights", num_classes=0,
                           drop_rate=cfg.drop_rate, **kwargs)
    # Random initialisation draws from torch's global RNG, which build_student seeds from the recipe's seed.
    return timm.create_model(cfg.name, pretrained=False, num_classes=0, drop_rate=cfg.drop_rate, **kwargs)


def build_student(recipe, num_classes: int, teacher_dim: int, text_embeddings: torch.Tensor | None = None,
                  baseline: bool = False, backbone: nn.Module | None = None, init: Path | None = None) -> Student:
    """The student a recipe asks for. A baseline student gets a classifier only (CE, no teacher).

    ``backbone``: one already built from ``recipe.student`` (e.g. when its hub weights were fetched up front), used
    as it is instead of building another. ``init``: an earlier student's model.pt to start from (``load_init``).
    """
    from .losses import active_needs
    from .utils import derived_seed

    needs = active_needs(recipe.loss)  # what the recipe's losses read from the student: logits, embedding
    # Random initialisation draws from torch's global RNG: seed it from the recipe so the initial weights do not
    # depend on which stages happened to run before in this process, and seed the heads on their own so they are
    # the same whether the backbone was built here or handed in.
    torch.manual_seed(derived_seed("student-init", recipe.train.seed))
    if backbone is None:
        backbone = create_backbone(recipe.student)
    torch.manual_seed(derived_seed("student-heads", recipe.train.seed))
    if baseline:
        return load_init(Student(backbone, num_classes), init, recipe.student)
    feature = "embedding" in needs or recipe.eval.zero_shot
    embed_dim = (recipe.student.embed_dim or teacher_dim) if feature else 0
    zero_shot = ZeroShotHead(text_embeddings) if recipe.eval.zero_shot and text_embeddings is not None else None
    classifier = not recipe.eval.zero_shot and "logits" in needs
    if zero_shot is None and not classifier and embed_dim == 0:
        classifier = True
    return load_init(Student(backbone, num_classes, embed_dim, classifier, zero_shot), init, recipe.student)


# ---------------------------------------------------------------------------------------------------------------
# Starting from an earlier run's student (student.init_from; P4's domain-specific stage after the agnostic one)


def student_arch(cfg) -> str:
    """The timm architecture a student section trains: its name less any pretrained tag (``.in1k``), or the model
    its packaged weights are."""
    return PACKAGED_ARCH.get(cfg.packaged_weights, cfg.name).split(".")[0]


def init_file(source: str) -> Path:
    """The model.pt a ``student.init_from`` path names: a run folder's student (with ``--seeds``, seed-0's, as export
    takes) or the file itself; a RecipeError naming the key when there is none."""
    from .recipe import RecipeError

    path = Path(source).expanduser()
    if path.is_dir():
        found = [f for f in (path / "student" / "model.pt", path / "seed-0" / "student" / "model.pt") if f.is_file()]
        if not found:
            raise RecipeError(f"Recipe key 'student.init_from': {source} is a folder without student/model.pt; name a "
                              "finished run folder, a student's model.pt, or recipe:NAME")
        return found[0]
    if not path.is_file():
        raise RecipeError(f"Recipe key 'student.init_from': {source} does not exist; it must be a finished run "
                          "folder, a student's model.pt, or recipe:NAME (a recipe run first)")
    return path


def saved_student(path: Path) -> tuple:
    """(student section, projection size) of a saved student, read without loading its tensors (memory-mapped)."""
    from .recipe import RecipeError, StudentCfg, build

    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return build(StudentCfg, saved["recipe"]["student"], "student"), int(saved.get("teacher_dim") or 0)
    except Exception as e:  # noqa: BLE001 - not a zip, not a student, a foreign pickle: one line naming the key
        raise RecipeError(f"Recipe key 'student.init_from': {path} is not a student edgedistill saved "
                          f"({type(e).__name__}: {' '.join(str(e).split())[:160]})") from e


def check_same_student(cfg, theirs, what: str, their_dim: int = 0):
    """``cfg`` (this recipe's student section) trains the architecture ``theirs`` did, with the same projection size
    when both are known (0: the teacher's, known only once it loads: ``load_init`` compares the tensors then).
    ``what`` names the earlier student's source, e.g. ``recipe 'p4-agnostic' trains``."""
    from .recipe import RecipeError

    def arch(c):
        return student_arch(c) + (f" with model_kwargs {c.model_kwargs}" if c.model_kwargs else "")

    if arch(cfg) != arch(theirs):
        raise RecipeError(f"Recipe key 'student.init_from': {what} a {arch(theirs)} student, but this recipe's "
                          f"student is a {arch(cfg)}: train the same architecture, or start from a {arch(cfg)}")
    their_dim = their_dim or theirs.embed_dim
    if cfg.embed_dim and their_dim and cfg.embed_dim != their_dim:
        raise RecipeError(f"Recipe key 'student.init_from': {what} a student projecting to {their_dim} dimensions, "
                          f"but this recipe's student.embed_dim is {cfg.embed_dim}")


def load_init(student: Student, path: Path | None, cfg) -> Student:
    """``student`` with an earlier student's backbone and, when both have one, its projection head loaded from
    ``path`` (None: as it is); a classifier or zero-shot head belongs to the new task and keeps its fresh
    initialisation. Every loaded tensor must have the shape this student's has: else one RecipeError naming both."""
    from .recipe import RecipeError

    if path is None:
        return student
    saved = torch.load(path, map_location="cpu", weights_only=True)
    theirs, mine = saved["state_dict"], student.state_dict()
    parts = ("backbone.", "proj.") if student.proj is not None and "proj.weight" in theirs else ("backbone.",)
    wanted = {k for k in mine if k.startswith(parts)}
    given = {k for k in theirs if k.startswith(parts)}
    wrong = sorted(k for k in wanted & given if theirs[k].shape != mine[k].shape)
    if wanted != given or wrong:
        other = saved["recipe"]["student"]["name"]
        k = (wrong or sorted(wanted ^ given))[0]
        there, here = (list(d[k].shape) if k in d else "absent" for d in (theirs, mine))
        raise RecipeError(f"Recipe key 'student.init_from': {path} holds a {other} student that does not fit this "
                          f"recipe's {cfg.name} student: {k} is {there} there and {here} here")
    student.load_state_dict({k: theirs[k] for k in given}, strict=False)
    return student


def student_input_spec(recipe, backbone: nn.Module | None = None) -> InputSpec:
    """The student's preprocessing: its timm data config, at the recipe's image size when one is set."""
    if backbone is None:
        backbone = create_backbone(recipe.student)
    spec = timm_input_spec(backbone, recipe.data.image_size)
    if recipe.student.packaged_weights.startswith("efficientnet-lite"):
        spec.mean, spec.std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    spec.crop_pct = recipe.data.crop_pct if recipe.data.crop_pct else spec.crop_pct
    spec.interpolation = recipe.student.interpolation or spec.interpolation
    return spec


def save_student(path, student: Student, recipe, class_names, spec: InputSpec, extra: dict | None = None):
    """Everything needed to rebuild the student without the teacher: export, demo and bench load this."""
    from .utils import atomic_torch_save

    atomic_torch_save({"state_dict": student.state_dict(), "recipe": recipe.to_dict(), "class_names": list(class_names),
                       "input": spec.to_dict(), "num_classes": len(class_names),
                       "teacher_dim": student.proj.out_features if student.proj is not None else 0,
                       "extra": extra or {}}, path)


def load_student(path_or_run, which: str = "student") -> tuple[Student, dict]:
    """Load a trained student from ``RUN/<which>/model.pt`` (or a model.pt path); returns (model, metadata).

    The metadata holds ``class_names`` and ``input`` (size, mean, std, interpolation, crop_pct).
    """
    from .recipe import Recipe, build

    path = Path(path_or_run)
    if path.is_dir():
        path = path / which / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"No trained student at {path}: run `edgedistill recipe run` into that folder first")
    saved = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only
    recipe = build(Recipe, saved["recipe"], "")
    # Students saved before the losses owned their projectors carried P2's (training-only) ones: not part of the model.
    state = {k: v for k, v in saved["state_dict"].items() if not k.startswith(("au_student.", "au_teacher."))}
    text = state.get("zero_shot.text")
    baseline = which == "baseline"
    student = build_student_from_state(recipe, saved, text, baseline)
    student.load_state_dict(state)
    return student.eval(), saved


def build_student_from_state(recipe, saved, text, baseline):
    from dataclasses import replace

    # Rebuild without downloading: the state dict replaces every weight anyway.
    # Nor from an earlier student (student.init_from): that was only where training started.
    offline = replace(recipe, student=replace(recipe.student, pretrained=False, packaged_weights="", weights="",
                                              init_from=""))
    if recipe.student.packaged_weights:  # packaged weights also fix the architecture name
        offline = replace(offline, student=replace(offline.student, name=student_arch(recipe.student)))
    teacher_dim = saved.get("teacher_dim") or (text.shape[1] if text is not None else 0)
    if not teacher_dim:
        teacher_dim = saved["state_dict"]["proj.weight"].shape[0] if "proj.weight" in saved["state_dict"] else 0
    return build_student(offline, saved["num_classes"], teacher_dim, text, baseline=baseline)
