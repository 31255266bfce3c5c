"""Recipe checks that need the registries: every registered name a recipe uses exists, before any work starts.

``recipe.py`` is the leaf everything imports; this module sits above the teachers, students, data, export and
corruption registries, and imports them inside its functions so that importing it stays cheap.
"""
from .recipe import Recipe, RecipeError, load_recipe


def load_checked(name_or_path, overrides=()) -> Recipe:
    """``load_recipe`` (types, ranges, choices), then the registered names and the combinations: what a run starts
    from."""
    recipe = load_recipe(name_or_path, overrides, section_presets())
    check_registered_names(recipe)
    check_combinations(recipe)
    return recipe


def section_presets() -> dict:
    """The sections a recipe may give as a preset name, e.g. ``loss: dkd`` (``losses/presets.py``)."""
    from .losses.presets import LOSS_PRESETS

    return {"loss": LOSS_PRESETS}


def check_registered_names(recipe: Recipe):
    """Every registered name the recipe uses exists, so a typo never costs a download or a GPU hour."""
    from .corruptions import CORRUPTIONS
    from .data import AUGMENTS, DATASETS
    from .data.remote import check_dataset
    from .packaged_weights import PACKAGED_WEIGHTS
    from .students import check_timm_name
    from .teachers import TEACHERS

    # 1. Names looked up in a registry.
    check_dataset(recipe.data, DATASETS)  # registered, torchvision/<Class> or hf/<id>; the data.hf_* keys
    pairs = [("teacher.name", recipe.teacher.name, TEACHERS), ("data.augment", recipe.data.augment, AUGMENTS)]
    if recipe.data.student_augment:
        pairs.append(("data.student_augment", recipe.data.student_augment, AUGMENTS))
    if recipe.student.packaged_weights:
        pairs.append(("student.packaged_weights", recipe.student.packaged_weights, PACKAGED_WEIGHTS))
    if recipe.eval.corruptions not in (("default",), ("all",)):
        pairs += [("eval.corruptions", name, CORRUPTIONS) for name in recipe.eval.corruptions]
    if recipe.synthetic is not None:
        from .data.generators import GENERATORS

        pairs.append(("synthetic.generator", recipe.synthetic.generator, GENERATORS))
    for dotted, name, registry in pairs:
        if name not in registry:
            raise RecipeError(f"Recipe key {dotted!r}: {registry.unknown_message(name)}")

    # 2. Checks that need the registered thing itself: the generator's kind, timm's model list, the export table.
    if recipe.synthetic is not None:
        from .data.generation import check_synth

        check_synth(recipe)
    check_timm_name("student.name", recipe.student.name)
    if recipe.student.pool != "avg":
        from .students import check_pool

        check_pool(recipe.student)
    if recipe.student.freeze_stages:
        from .students import check_freeze

        check_freeze(recipe.student)
    if recipe.teacher.finetune_freeze_stages:
        from .students import check_teacher_freeze

        check_teacher_freeze(recipe.teacher)
    if recipe.export is not None:
        from .export import check_export_request

        naming("Recipe keys 'export.formats' and 'export.precision'", check_export_request, recipe.export.formats,
               recipe.export.precision)
    if recipe.bench is not None:
        from .bench import check_bench_backends

        naming("Recipe key 'bench.backends'", check_bench_backends, recipe.bench.backends)


def naming(keys: str, check, *args):
    """Run a module's own check, putting the recipe key(s) it is about in front of its message."""
    try:
        check(*args)
    except RecipeError as e:
        raise RecipeError(f"{keys}: {e}") from e


def check_combinations(recipe: Recipe):
    """Settings that only make sense together, and what the named teacher can do (its declared capabilities)."""
    from .teachers import capability_problem
    from .weights import check_weight_paths

    problem = capability_problem(recipe.teacher)
    if problem:
        raise RecipeError(problem)
    check_weight_paths(recipe)  # local weights files and folders exist and are of the kind each loader reads
    check_student_init(recipe)
    check_losses(recipe)
    if recipe.teacher.mode == "finetune" and recipe.teacher.head not in ("linear", "mlp"):
        raise RecipeError("Recipe key 'teacher.mode' is 'finetune', which trains a new linear or mlp head with the "
                          f"encoder; set teacher.head to linear or mlp (it is {recipe.teacher.head!r})")
    for mix in ("mixup", "cutmix"):
        if getattr(recipe.data, mix) and recipe.train.teacher != "online":
            raise RecipeError(f"Recipe key 'data.{mix}' needs 'train.teacher: online' (the teacher must see the mixed "
                              f"image); set train.teacher=online or data.{mix}=0")
    if recipe.train.eval_every and recipe.data.val_fraction <= 0:
        raise RecipeError("Recipe key 'train.eval_every' evaluates on the validation split, which is empty: set "
                          "data.val_fraction (e.g. 0.1) or train.eval_every=0")
    if not recipe.data.real_train and recipe.synthetic is None:
        raise RecipeError("Recipe key 'data.real_train' is false but the recipe has no 'synthetic' section: "
                          "there would be nothing to train on")
    if recipe.eval.zero_shot and recipe.teacher.head != "zeroshot":
        raise RecipeError("Recipe key 'eval.zero_shot' needs 'teacher.head: zeroshot' (class text embeddings)")
    if recipe.eval.student_probe and not recipe.eval.student_probe_lr:
        raise RecipeError("Recipe key 'eval.student_probe_lr' is empty: give the probe at least one learning rate")


def check_student_init(recipe: Recipe):
    """``student.init_from`` names a student of this recipe's architecture: a finished run folder or model.pt, or
    ``recipe:NAME``, a recipe that passes every check itself (what it trains is compared before any of it runs)."""
    from .students import INIT_RECIPE, check_same_student, init_file, saved_student

    s = recipe.student
    if not s.init_from:
        return
    given = [k for k, v in (("pretrained", s.pretrained), ("weights", s.weights),
                            ("packaged_weights", s.packaged_weights)) if v]
    if given:
        raise RecipeError(f"Recipe keys 'student.init_from' and 'student.{given[0]}' both set the student's starting "
                          "weights: set one (the earlier student's weights replace every backbone weight)")
    if s.init_from.startswith(INIT_RECIPE):
        earlier = init_recipe(recipe)
        check_same_student(s, earlier.student, f"recipe {earlier.name!r} trains")
    else:
        path = init_file(s.init_from)
        theirs, their_dim = saved_student(path)
        check_same_student(s, theirs, f"{path} holds", their_dim)


def init_recipe(recipe: Recipe) -> Recipe:
    """The recipe ``student.init_from: recipe:NAME`` names, through every check (``load_checked``); a chain of such
    recipes that comes back to one already in it is refused, as are two of one name (they would share a folder)."""
    from .recipe import resolve_recipe_path
    from .students import INIT_RECIPE

    chain, current = [recipe.name], recipe
    while current.student.init_from.startswith(INIT_RECIPE):
        source = current.student.init_from
        try:
            current = load_recipe(resolve_recipe_path(source[len(INIT_RECIPE):]), (), section_presets())
        except RecipeError as e:
            raise RecipeError(f"Recipe key 'student.init_from' ({source}): {e}") from e
        if current.name in chain:
            raise RecipeError(f"Recipe key 'student.init_from': the recipes start from each other in a circle "
                              f"({' -> '.join(chain + [current.name])}); each needs a name of its own and the chain "
                              "must end at a recipe without recipe:NAME")
        chain.append(current.name)
    source = recipe.student.init_from
    try:
        return load_checked(resolve_recipe_path(source[len(INIT_RECIPE):]))
    except RecipeError as e:
        raise RecipeError(f"Recipe key 'student.init_from' ({source}): {e}") from e


def check_losses(recipe: Recipe):
    """Each active loss's declared constraints (its registry entry): e.g. hint needs the online teacher."""
    from .losses import active_entries

    for entry in active_entries(recipe.loss):
        for constraint in entry.constraints:
            problem = constraint(recipe)
            if problem:
                raise RecipeError(problem)
