"""Recipes: every component variant builds, every documented invalid combination is refused by name,
overrides are typed dotted paths (and the old flat names), equal recipes share a run key."""
import dataclasses
import typing

import pytest

from ptq4vit import RECIPES, Recipe, UserError, get_preset, get_recipe
from ptq4vit.harness.cli.common import parse_overrides
from ptq4vit.harness.runner import resolved_recipe
from ptq4vit.harness.store import run_key
from ptq4vit.recipes import (GPTQ, MSE, BiasCorrection, Cosine, FloatAttention, GridSearch, Hessian, LayerNormReparam,
                             LogGelu, LogSoftmax, Nearest, Percentile, Rotation, Smoothing, TwinGelu, TwinSoftmax,
                             NoReconstruction, Reconstruction, UniformGelu, UniformSoftmax, Weights, from_flat)
from ptq4vit.recipes.component import Component

#: One non-default instance of every component variant, with the flat fields its recipe must resolve to.
VARIANTS = [
    (dict(calibration=GridSearch(metric=Hessian(gradients="kl-official", grad_chunk=2), alpha=0.1, beta=1.1,
                                 n_candidates=7, rounds=2, search_rows=64)),
     dict(metric="hessian", grad_source="kl-official", grad_chunk=2, alpha=0.1, beta=1.1, n_candidates=7, rounds=2,
          search_rows=64)),
    (dict(calibration=GridSearch(metric=Cosine())), dict(metric="cosine")),
    (dict(calibration=GridSearch(metric=MSE())), dict(metric="mse")),
    (dict(calibration=Percentile(), softmax=UniformSoftmax(), gelu=UniformGelu()), dict(calibration="percentile")),
    (dict(weights=Weights(granularity="channel", conv_per_channel=False, rounding=Nearest())),
     dict(w_granularity="channel", conv_per_channel=False, weight_rounding="nearest")),
    (dict(weights=Weights(rounding=GPTQ(damp=0.1, act_order=False, block=32, quantized_inputs=True))),
     dict(weight_rounding="gptq", gptq_damp=0.1, gptq_act_order=False, gptq_block=32, gptq_quantized_inputs=True)),
    (dict(softmax=UniformSoftmax(renorm=True)), dict(softmax_twin=False, softmax_renorm=True)),
    (dict(softmax=TwinSoftmax(form="sum", split_search_quantized_b=False)),
     dict(softmax_twin=True, softmax_twin_form="sum", split_search_quantized_b=False)),
    (dict(softmax=TwinSoftmax(top=True, renorm=True)), dict(softmax_twin=True, softmax_twin_top=True, softmax_renorm=True)),
    (dict(softmax=LogSoftmax(base="log2", renorm=True)),
     dict(softmax_twin=False, softmax_log="log2", softmax_log_scale=False, softmax_renorm=True)),
    (dict(calibration=Percentile(), softmax=LogSoftmax(), gelu=UniformGelu()),
     dict(softmax_log="log_sqrt2", softmax_log_scale=True)),
    (dict(softmax=FloatAttention()), dict(quantize_attention=False, softmax_twin=False)),
    (dict(gelu=UniformGelu()), dict(gelu_twin=False, gelu_log="none")),
    (dict(gelu=TwinGelu(pow2=False)), dict(gelu_twin=True, gelu_pow2=False)),
    (dict(gelu=LogGelu(base="log_sqrt2")), dict(gelu_twin=False, gelu_log="log_sqrt2")),
    (dict(inputs="asymmetric", head_bits=4), dict(asymmetric_inputs=True, head_bits=4)),
    (dict(calibration=Percentile(), softmax=UniformSoftmax(), gelu=UniformGelu(), patch_input_bits=6),
     dict(patch_input_bits=6)),
    (dict(gelu=UniformGelu(), transforms=(Rotation(kind="orthogonal", seed=3, heads=False),)),
     dict(rotate_residual=True, rotate_heads=False, rotate_fc2=True, rotation_kind="orthogonal", rotation_seed=3)),
    (dict(transforms=(Smoothing(alpha=0.7),)), dict(smooth_alpha=0.7)),
    (dict(calibration=Percentile(), softmax=UniformSoftmax(), gelu=UniformGelu(),
          transforms=(LayerNormReparam(round_zero_point=True, fold_float64=True),)),
     dict(reparam_ln=True, reparam_round_zero_point=True, reparam_fold_float64=True)),
    (dict(transforms=(BiasCorrection(),)), dict(bias_correction=True)),
]


@pytest.mark.parametrize("components, flat", VARIANTS, ids=lambda v: ",".join(v) if isinstance(v, dict) else None)
def test_every_variant_builds_and_reads_back(components, flat):
    r = Recipe(**components)
    view = r.flat()
    assert {k: getattr(view, k) for k in flat} == flat
    assert from_flat(view) == r                        # the flat view reads back as the same recipe
    assert Recipe.from_dict(r.to_dict()) == r          # and so does the stored form


def test_every_variant_class_is_covered():
    import ptq4vit.recipes as recipes
    classes = {c for c in vars(recipes).values() if isinstance(c, type) and issubclass(c, Component)}
    seen = set()

    def walk(v):
        if isinstance(v, Component):
            seen.add(type(v))
            for f in dataclasses.fields(v):
                walk(getattr(v, f.name))
        elif isinstance(v, tuple):
            for x in v:
                walk(x)
    for components, _ in VARIANTS + RECONSTRUCTION_VARIANTS:
        for v in components.values():
            walk(v)
    assert classes - seen == set()


#: The reconstruction slot runs after the engine: the flat view has no field of it.
RECONSTRUCTION_VARIANTS = [
    (dict(reconstruction=NoReconstruction()), {}),
    (dict(reconstruction=Reconstruction(iterations=7, batch_size=2, images=9, lr_rounding=0.1, lr_steps=0.1, lr_bias=0.2,
                                        learn_rounding=True, learn_steps=True, learn_twin_log=False, learn_bias=True, qdrop=0.0,
                                        inputs="float", unit="sublayer", fisher=True, seed=4, rounding="adaround", warmup=0.0,
                                        network_iterations=3, network_rounding=False,
                                        beta_start=3.0, beta_end=3.0, rounding_weight=0.0)), {}),
]


@pytest.mark.parametrize("components", [c for c, _ in RECONSTRUCTION_VARIANTS], ids=["none", "learned"])
def test_reconstruction_variants_build_store_and_leave_the_flat_view_alone(components):
    r = get_recipe("rotq").replace("reconstruction", components["reconstruction"].to_dict())
    assert r.reconstruction == components["reconstruction"]
    assert Recipe.from_dict(r.to_dict()) == r
    assert r.flat() == RECIPES["rotq"].flat()
    # left out of the stored data when off: run keys and stored recipes are what they were without the slot
    assert ("reconstruction" in r.to_dict()) == (r.reconstruction.variant == "learned")


def test_reconstruction_is_set_by_paths_in_any_order_and_survives_flat_overrides():
    want = Reconstruction(iterations=50, qdrop=0.0)
    for overrides in (parse_overrides(["reconstruction=learned", "reconstruction.iterations=50", "reconstruction.qdrop=0"]),
                      parse_overrides(["reconstruction.qdrop=0", "reconstruction.iterations=50", "reconstruction=learned"])):
        assert get_recipe("rotq", **overrides).reconstruction == want
    learned = get_recipe("rotq", reconstruction="learned")
    assert get_recipe(learned, n_candidates=20).reconstruction == Reconstruction()    # a flat name keeps it
    assert "reconstruction=learned" in learned.summary()
    keys = {run_key({"recipe": resolved_recipe("rotq", o)}) for o in
            ({}, {"reconstruction": "learned"}, {"reconstruction": "learned", "reconstruction.images": 128})}
    assert len(keys) == 3
    with pytest.raises(UserError, match="reconstruction.iterations: none has no 'iterations'"):
        get_recipe("rotq", **{"reconstruction.iterations": 5})
    with pytest.raises(UserError, match="reconstruction must be one of none, learned, got 'x'"):
        get_recipe("rotq", reconstruction="x")


#: Every documented invalid combination and the one line that refuses it.
INVALID = [
    (lambda: GridSearch(alpha=0.5, beta=0.5), "grid_search needs 0 < alpha < beta"),
    (lambda: GridSearch(n_candidates=0), "grid_search.n_candidates must be at least 1"),
    (lambda: GridSearch(rounds=0), "grid_search.rounds must be at least 1"),
    (lambda: GridSearch(search_rows=-1), r"grid_search.search_rows must be 0 \(all rows\) or positive"),
    (lambda: Hessian(grad_chunk=0), "hessian.grad_chunk must be at least 1"),
    (lambda: Hessian(grad_chunk=8), "hessian.grad_chunk applies to kl-official gradients only"),
    (lambda: GPTQ(damp=-1.0), "gptq needs damp >= 0 and block >= 1"),
    (lambda: GPTQ(block=0), "gptq needs damp >= 0 and block >= 1"),
    (lambda: GPTQ(damp=0.0, quantized_inputs=True), "gptq.quantized_inputs needs damp > 0"),
    (lambda: Rotation(residual=False, heads=False, fc2=False), "rotation rotates nothing"),
    (lambda: Smoothing(alpha=0.0), r"smoothing.alpha must be in \(0, 1\]"),
    (lambda: Recipe(head_bits=9), "recipe head_bits must be 0"),
    (lambda: Recipe(transforms=(BiasCorrection(), BiasCorrection())), "recipe transforms name a transform twice"),
    (lambda: Recipe(patch_input_bits=8), "patch_input_bits needs calibration=percentile"),
    (lambda: Recipe(transforms=(LayerNormReparam(),)), "the ln_reparam transform needs calibration=percentile"),
    (lambda: Recipe(calibration=Percentile(), gelu=UniformGelu()), "calibration=percentile has no initialisation "
                                                                    "for softmax=twin"),
    (lambda: Recipe(calibration=Percentile(), softmax=UniformSoftmax()), "percentile has no initialisation for gelu=twin"),
    (lambda: Recipe(calibration=Percentile(), softmax=UniformSoftmax(), gelu=UniformGelu(),
                    weights=Weights(granularity="channel")), "percentile has no initialisation for weights"),
    (lambda: Recipe(calibration=Percentile(), softmax=UniformSoftmax(), gelu=UniformGelu(), inputs="asymmetric"),
     "percentile has no initialisation for inputs=asymmetric"),
    (lambda: Recipe(calibration=Percentile(), softmax=UniformSoftmax(), gelu=UniformGelu(),
                    transforms=(Smoothing(),)), "percentile has no initialisation for the smoothing transform"),
    (lambda: Recipe(calibration=Percentile(), softmax=UniformSoftmax(), gelu=UniformGelu(),
                    transforms=(BiasCorrection(),)), "percentile has no initialisation for the bias_correction"),
    (lambda: Recipe(transforms=(Rotation(),)), "rotation.fc2 makes fc2's input no longer post-GELU: it needs "
                                                "gelu=uniform, not gelu=twin"),
    (lambda: Recipe(gelu=LogGelu(), transforms=(Rotation(),)), "it needs gelu=uniform, not gelu=log"),
    (lambda: Recipe(calibration=Percentile(), softmax=UniformSoftmax(), gelu=UniformGelu(),
                    transforms=(Rotation(), LayerNormReparam())), "ln_reparam folds into LayerNorm's affine"),
    (lambda: Recipe(softmax="cubic"), "softmax must be one of uniform, twin, log, float, got 'cubic'"),
    (lambda: TwinSoftmax(form="both"), "twin field form must be one of 'select', 'sum'"),
    (lambda: TwinSoftmax(form="sum", top=True), "softmax.top needs softmax.form='select'"),
]


@pytest.mark.parametrize("make, message", INVALID, ids=[m.replace("\\", "") for _, m in INVALID])
def test_invalid_combinations_are_refused_in_one_line(make, message):
    with pytest.raises(UserError, match=message) as e:
        make()
    assert "\n" not in str(e.value)


def test_dotted_paths_override_in_python():
    r = get_recipe("rotq", **{"transforms.rotation.seed": 1, "calibration.alpha": 0.3})
    assert r.transform("rotation").seed == 1 and r.calibration.alpha == 0.3
    assert r.replace("calibration.metric", "cosine").calibration.metric == Cosine()
    assert r.replace("softmax", "twin") is not r and r.replace("softmax", "twin").softmax == r.softmax  # kept as is
    assert get_recipe("ptq4vit", softmax="log").softmax == LogSoftmax()
    assert get_recipe("rotq", softmax="log").softmax == LogSoftmax(renorm=True)      # shared parameters carry over
    assert get_recipe("rotq", softmax="log") == get_recipe("rotq", softmax_twin=False, softmax_log="log_sqrt2")
    assert get_recipe("ptq4vit", transforms="bias_correction").transforms == (BiasCorrection(),)


@pytest.mark.parametrize("recipe, path, value, message", [
    ("ptq4vit", "weights.rounding.damp", 0.1, "weights.rounding.damp: nearest has no 'damp'"),
    ("repq-vit", "calibration.metric", "cosine", "calibration.metric: percentile has no 'metric'"),
    ("deploy8", "softmax.form", "sum", "softmax.form: float has no 'form'"),
    ("ptq4vit", "transforms.rotation.seed", 1, "transforms.rotation.seed: the recipe has no rotation transform"),
    ("ptq4vit", "calibration.alpha", "0.3", "calibration.alpha must be a finite number, got '0.3'"),
])
def test_paths_that_change_nothing_are_refused_by_name(recipe, path, value, message):
    with pytest.raises(UserError, match=message):
        get_recipe(recipe, **{path: value})


@pytest.mark.parametrize("recipe, overrides, message", [
    ("repq-vit", dict(metric="cosine"), "override metric='cosine' would change nothing in recipe repq-vit "
                                         r"\(calibration.metric does not apply"),
    ("repq-vit", dict(n_candidates=7), "override n_candidates=7 would change nothing"),
    ("deploy8", dict(softmax_twin=True), "override softmax_twin=True would change nothing"),
    ("ptq4vit", dict(gptq_damp=0.1), "override gptq_damp=0.1 would change nothing .*weights.rounding.damp"),
    ("ptq4vit", dict(rotation_seed=1), "override rotation_seed=1 would change nothing"),
    ("base", dict(gelu_pow2=False), "override gelu_pow2=False would change nothing"),
])
def test_flat_overrides_that_change_nothing_are_refused(recipe, overrides, message):
    with pytest.raises(UserError, match=message):
        get_recipe(recipe, **overrides)


def test_flat_names_and_paths_give_one_recipe_and_one_run_key():
    spellings = [parse_overrides(["metric=cosine", "alpha=0.3", "gelu_twin=false"]),
                 parse_overrides(["calibration.metric=cosine", "calibration.alpha=0.3", "gelu=uniform"]),
                 {"calibration.metric": Cosine(), "calibration.alpha": 0.3, "gelu": UniformGelu()}]
    recipes = [get_recipe("ptq4vit", **s) for s in spellings]
    assert recipes[0] == recipes[1] == recipes[2]
    keys = {run_key({"preset": "ptq4vit", "recipe": resolved_recipe("ptq4vit", s)}) for s in spellings}
    assert len(keys) == 1
    assert run_key({"recipe": resolved_recipe("ptq4vit", {})}) != run_key({"recipe": resolved_recipe("ptq4vit", spellings[0])})


def test_command_line_paths_are_typed_by_their_declaration():
    assert parse_overrides(["transforms.rotation.seed=1", "calibration.alpha=1", "softmax.renorm=on"]) == \
        {"transforms.rotation.seed": 1, "calibration.alpha": 1.0, "softmax.renorm": True}
    assert isinstance(parse_overrides(["calibration.alpha=1"])["calibration.alpha"], float)
    with pytest.raises(UserError, match="recipe path transforms.rotation.seed must be an int, got 'x'"):
        parse_overrides(["transforms.rotation.seed=x"])
    with pytest.raises(UserError, match="unknown recipe path 'calibration.colour'"):
        parse_overrides(["calibration.colour=red"])


def test_named_recipes_are_their_presets():
    for name, r in RECIPES.items():
        assert get_preset(name) == r.flat() and from_flat(r.flat()) == r
        assert r.summary().startswith("calibration=")
    assert typing.get_args(typing.get_type_hints(Recipe)["inputs"]) == ("symmetric", "asymmetric")


def test_checkpoints_store_the_recipe_and_older_files_read_their_flat_preset(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    import ptq4vit
    from ptq4vit import checkpoint as ck
    from _fastq import fast_quantize
    from conftest import make_tiny

    model, images = make_tiny("vit")
    qm = fast_quantize(model, images, get_preset("official", metric="cosine"))
    path = tmp_path / "q.safetensors"
    ptq4vit.save(qm, path)
    loaded = ptq4vit.load(path)
    assert loaded.recipe == get_recipe("official", **{"calibration.metric": "cosine"})
    assert loaded.recipe.description == RECIPES["official"].description

    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["ptq4vit"])
    assert meta["recipe"] == get_recipe("official", metric="cosine").to_dict()

    def rewritten(name, meta):
        meta_json = json.dumps(meta, sort_keys=True)
        save_file(tensors, str(tmp_path / name), metadata={"format": "pt", "ptq4vit": meta_json,
                                                            "ptq4vit_content_sha256": ck.content_digest(meta_json, tensors)})
        return tmp_path / name

    older = {k: v for k, v in meta.items() if k != "recipe"}   # a file from before recipes: the flat preset alone
    assert ptq4vit.load(rewritten("old.safetensors", older)).recipe == loaded.recipe
    edited = {**meta, "recipe": RECIPES["official"].to_dict()}  # digest intact, recipe and flat preset disagree
    with pytest.raises(ptq4vit.CheckpointError, match="recipe and its flat preset disagree"):
        ptq4vit.load(rewritten("edited.safetensors", edited))
