"""The named recipes (the presets of README's table) and :func:`get_recipe`."""
from __future__ import annotations

from typing import Any, Union

from ..errors import UserError
from .calibration import MSE, Cosine, GridSearch, Hessian, Percentile
import dataclasses

from .flat import FLAT_PATHS, Preset
from .operands import FloatAttention, LogGelu, LogSoftmax, TwinGelu, TwinSoftmax, UniformGelu, UniformSoftmax
from .recipe import Recipe
from .transforms import BiasCorrection, LayerNormReparam, Rotation, Smoothing
from .weights import GPTQ, Nearest, Weights

#: fast8's and deploy8's short cosine grid on 2048 tokens, one round.
_SHORT_GRID = GridSearch(metric=Cosine(), alpha=0.5, beta=1.2, n_candidates=20, rounds=1, search_rows=2048)

def from_flat(p: Preset):
    """The recipe a flat preset means: the settings its switches leave unused are dropped (so two
    flat presets that compute the same give one recipe); combinations no recipe can hold raise UserError
    (the recipe's own rules, and two switches that pick different quantizers for one operand)."""
    if p.calibration == "percentile":
        calibration = Percentile()
    else:
        metric = {"cosine": Cosine, "mse": MSE}.get(p.metric)
        if metric is None:
            metric = Hessian(gradients=p.grad_source,
                             grad_chunk=p.grad_chunk if p.grad_source == "kl-official" else 4)
        else:
            metric = metric()
        calibration = GridSearch(metric=metric, alpha=p.alpha, beta=p.beta, n_candidates=p.n_candidates,
                                 rounds=p.rounds, search_rows=p.search_rows)
    rounding = GPTQ(damp=p.gptq_damp, act_order=p.gptq_act_order, block=p.gptq_block,
                    quantized_inputs=p.gptq_quantized_inputs) if p.weight_rounding == "gptq" else Nearest()
    if p.calibration == "percentile" and (p.w_granularity, p.conv_per_channel, p.weight_rounding) == \
            ("block", True, "nearest"):
        weights = Weights()
    else:
        weights = Weights(granularity=p.w_granularity, conv_per_channel=p.conv_per_channel, rounding=rounding)
    if not p.quantize_attention:
        softmax = FloatAttention()
    elif p.softmax_log != "none":
        softmax = LogSoftmax(base=p.softmax_log, renorm=p.softmax_renorm)
    elif p.softmax_twin:
        softmax = TwinSoftmax(form=p.softmax_twin_form, split_search_quantized_b=p.split_search_quantized_b,
                              renorm=p.softmax_renorm, top=p.softmax_twin_top)
    else:
        softmax = UniformSoftmax(renorm=p.softmax_renorm)
    if p.gelu_log != "none" and p.gelu_twin:  # two switches for one slot: the flat format's own ambiguity
        raise UserError(f"gelu_log={p.gelu_log!r} and gelu_twin both quantize fc2's post-GELU input: "
                        f"set gelu_twin=False with it")
    if p.gelu_log != "none":
        gelu = LogGelu(base=p.gelu_log)
    elif p.gelu_twin:
        gelu = TwinGelu(pow2=p.gelu_pow2)
    else:
        gelu = UniformGelu()
    transforms = []
    if p.rotate_residual or p.rotate_heads or p.rotate_fc2:
        transforms.append(Rotation(kind=p.rotation_kind, seed=p.rotation_seed, residual=p.rotate_residual,
                                   heads=p.rotate_heads, fc2=p.rotate_fc2))
    if p.smooth_alpha > 0:
        transforms.append(Smoothing(alpha=p.smooth_alpha))
    if p.reparam_ln:
        transforms.append(LayerNormReparam(round_zero_point=p.reparam_round_zero_point,
                                           fold_float64=p.reparam_fold_float64))
    if p.bias_correction:
        transforms.append(BiasCorrection())
    return Recipe(name=p.name, description=p.description, calibration=calibration, weights=weights,
                  softmax=softmax, gelu=gelu, inputs="asymmetric" if p.asymmetric_inputs else "symmetric",
                  head_bits=p.head_bits, patch_input_bits=p.patch_input_bits, transforms=tuple(transforms))


def apply_flat(recipe, overrides: dict):
    """``recipe`` with old flat field names overridden (``metric="cosine"``, ``gelu_twin=False``).

    The flat view is overridden and read back; a name whose value the recipe then does not hold
    (a GPTQ option while rounding is nearest, the metric under percentile calibration) would change
    nothing and is refused by name, with the dotted path it lives at.
    """
    fields = {f.name for f in dataclasses.fields(Preset)} - {"name", "description"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UserError(f"unknown preset field(s) {', '.join(unknown)}; valid fields: {', '.join(sorted(fields))}")
    wanted = dataclasses.replace(recipe.flat(), **overrides)
    # the flat view has no reconstruction (it runs after the engine): it carries over as it was
    result = dataclasses.replace(from_flat(wanted), reconstruction=recipe.reconstruction)
    got = result.flat()
    dead = [k for k in overrides if getattr(got, k) != getattr(wanted, k)]
    if dead:
        k = dead[0]
        raise UserError(f"override {k}={getattr(wanted, k)!r} would change nothing in recipe {recipe.name} "
                        f"({FLAT_PATHS[k]} does not apply to {result.summary()})")
    return result


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe(
        name="base",
        description="BasePTQ as the released scripts run it: no twins, hessian metric with the released "
                    "(zero-loss) gradients, alpha=0.5, one round, per-tensor patch-embedding weight",
        calibration=GridSearch(metric=Hessian(gradients="kl-official"), alpha=0.5, rounds=1),
        weights=Weights(conv_per_channel=False), softmax=UniformSoftmax(), gelu=UniformGelu()),
    Recipe(
        name="base-cosine",
        description="BasePTQ as the paper's README table reports it: PTQ4ViT's grid and rounds, cosine metric, no twins",
        calibration=GridSearch(metric=Cosine()), softmax=UniformSoftmax(), gelu=UniformGelu()),
    Recipe(
        name="official",
        description="PTQ4ViT exactly as released: hessian metric on kl(p||p) gradients, hi+lo softmax twin, "
                    "split searched with v float, free GELU twin",
        calibration=GridSearch(metric=Hessian(gradients="kl-official")),
        softmax=TwinSoftmax(form="sum", split_search_quantized_b=False), gelu=TwinGelu(pow2=False)),
    Recipe(
        name="ptq4vit",
        description="PTQ4ViT with the released code's defects mended: cross-entropy gradients on the float "
                    "model's labels, region-select softmax twin, v quantized in the split search, "
                    "power-of-two GELU twin"),
    Recipe(
        name="fast8",
        description="Deployment at 8 bits: ptq4vit's sites and twins, scales from a short grid (20 "
                    "candidates, 0.5-1.2 of the max-based step) scored by cosine similarity on 2048 "
                    "evenly spaced tokens of each activation, one round, no gradients (at 8 bits the "
                    "wide grid and the hessian metric buy little)",
        calibration=_SHORT_GRID),
    Recipe(
        name="deploy8",
        description="Deployment at 8 bits on a runtime's int8 kernels (OpenVINO, ONNX Runtime): only the "
                    "linear layers are quantized (per-tensor activations, per-channel weights rounded to "
                    "nearest), attention stays float for the runtimes' fused attention kernels, no twins "
                    "(one integer GEMM per layer), the inputs of qkv, fc1 and fc2 smoothed (alpha 0.95; "
                    "the division folds into the LayerNorm / fc1 at run time), the inputs of qkv, fc1, fc2 "
                    "and the head asymmetric (an integer zero point), each bias corrected by the mean "
                    "output error of its layer's quantization; input scales from fast8's short cosine "
                    "grid on 2048 tokens, one pass, no gradients",
        calibration=_SHORT_GRID, weights=Weights(granularity="channel"), softmax=FloatAttention(),
        gelu=UniformGelu(), inputs="asymmetric", transforms=(Smoothing(alpha=0.95), BiasCorrection())),
    Recipe(
        name="rotq",
        description="ptq4vit's Hessian-guided search and softmax twin on a rotated model (residual stream, "
                    "per-head q/k/v, online fc2 input), with per-channel GPTQ-rounded linear weights; "
                    "a coarser grid (alpha=0.2, 50 candidates), since rotated operands have no far outliers to clip; "
                    "the classifier head at 8 bits; each quantized softmax row rescaled to its float mass; "
                    "the inputs of qkv, fc1, fc2 and the head asymmetric (an integer zero point) and each "
                    "linear layer's bias corrected by its mean output error",
        calibration=GridSearch(alpha=0.2, n_candidates=50), weights=Weights(granularity="channel", rounding=GPTQ()),
        softmax=TwinSoftmax(renorm=True), gelu=UniformGelu(), inputs="asymmetric", head_bits=8,
        transforms=(Rotation(), BiasCorrection())),
    Recipe(
        name="repq-vit",
        description="RepQ-ViT (Li et al., ICCV 2023) as released: asymmetric uniform quantizers with percentile "
                    "ranges calibrated in forward order on quantized inputs, per-channel weights, per-channel "
                    "post-LayerNorm ranges reparameterized into LayerNorm and qkv/fc1, a scaled log-sqrt2 "
                    "post-softmax quantizer, the image input at 8 bits",
        calibration=Percentile(), softmax=LogSoftmax(base="log_sqrt2"), gelu=UniformGelu(), patch_input_bits=8,
        transforms=(LayerNormReparam(),)),
)}


Preset.named_views = {name: r.flat() for name, r in RECIPES.items()}
Preset.read_back = staticmethod(from_flat)


def get_recipe(recipe: Union[str, Recipe, Preset] = "ptq4vit", **overrides: Any) -> Recipe:
    """A named recipe (or a Recipe, or a flat Preset), with overrides.

    Overrides are dotted paths (``**{"calibration.alpha": 0.3}``, ``**{"softmax": "log"}``) or the
    old flat field names (``metric="cosine"``, ``gelu_twin=False``; ``FLAT_PATHS`` says where each
    lives); flat names apply first, then the paths, shorter ones first (a variant before its fields). Unknown names, values of the
    wrong type, combinations that cannot work and overrides that would change nothing raise UserError.
    """
    if isinstance(recipe, Recipe):
        base = recipe
    elif isinstance(recipe, Preset):
        base = from_flat(recipe)
    elif isinstance(recipe, str) and recipe in RECIPES:
        base = RECIPES[recipe]
    else:
        raise UserError(f"unknown preset {recipe!r}; choose one of the recipes {', '.join(RECIPES)}")
    flat = {k: v for k, v in overrides.items() if is_flat_name(k, v)}
    if flat:
        base = apply_flat(base, flat)
    # a variant before its parameters, whatever the order given (softmax=log, then softmax.base=...)
    for path, value in sorted(overrides.items(), key=lambda kv: kv[0].count(".")):
        if path not in flat:
            base = base.replace(path, value)
    return base


#: Recipe fields that are no flat field: ``softmax=twin`` is a path.
_TOP_LEVEL_PATHS = ("softmax", "gelu", "weights", "inputs", "transforms", "reconstruction")


def is_flat_name(name: str, value: Any) -> bool:
    """Whether an override names an old flat field rather than a recipe path. ``calibration`` is both:
    the flat field takes ``"search"``/``"percentile"``, the path a variant (``"grid_search"``) or a component."""
    if name == "calibration":
        return isinstance(value, str) and value != "grid_search"
    return "." not in name and name not in _TOP_LEVEL_PATHS
