"""The flat view of a recipe, as checkpoints store it, and the old flat field names.

:class:`Preset` has one field per setting, every field present whether or not the recipe uses
it. It is derived from a :class:`~ptq4vit.recipes.Recipe` by :func:`to_flat` (each component writes
its own fields) and never the source of truth: the calibration engine reads the recipe, and
``ptq4vit.recipes.named.from_flat`` reads a flat preset back (format 1 and 2 checkpoints store only
it, and the old flat override names write it), dropping what the recipe's components leave unused.
The rules among the settings live once, in the recipe's components. ``FLAT_PATHS`` says where each
flat name lives in a recipe.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, ClassVar, Literal

from ..errors import UserError
from ..typecheck import check_fields
from .calibration import GradSource
from .operands import LogBase
from .transforms import RotationKind

Metric = Literal["cosine", "mse", "hessian"]
LogQuantization = Literal["none", LogBase]


@dataclass(frozen=True)
class Preset:
    #: Registered by :mod:`ptq4vit.recipes.named`: the named recipes' flat views, and how a flat
    #: preset reads back as a recipe (``from_flat``), for :meth:`overrides`.
    named_views: ClassVar[dict] = {}
    read_back: ClassVar[Callable] = staticmethod(lambda p: p)

    name: str
    description: str
    #: Score of a candidate scale (docs/method.md §2).
    metric: Metric = "hessian"
    #: Where ``g = dL/dO`` of the hessian metric comes from (docs/method.md §5).
    grad_source: GradSource = "ce-fp-label"
    #: Candidate grid ``Δ0 · (α + i(β-α)/n)``, i = 0..n-1.
    alpha: float = 0.01
    beta: float = 1.2
    n_candidates: int = 100
    #: Alternating weight/input search rounds (stops early once a round changes nothing).
    rounds: int = 3
    #: Twin uniform quantizer on the post-softmax operand of softmax @ v.
    softmax_twin: bool = True
    #: ``"select"`` (the paper's twin) or ``"sum"`` (the released code's hi + lo).
    softmax_twin_form: Literal["select", "sum"] = "select"
    #: Quantize v while searching the softmax split (the released code leaves it float).
    split_search_quantized_b: bool = True
    #: Search a top of the softmax twin's range with its split (docs/lowbit.md §12).
    softmax_twin_top: bool = False
    #: Twin uniform quantizer on the post-GELU input of fc2.
    gelu_twin: bool = True
    #: Restrict Δ+ of the GELU twin to ``2^m Δ-`` (needed for integer kernels).
    gelu_pow2: bool = True
    #: Patch-embedding weight: one scale per output channel (else one per tensor).
    conv_per_channel: bool = True
    #: Images per backward pass for ``kl-official`` gradients (the released code's 4).
    grad_chunk: int = 4
    #: Score candidates on this many evenly spaced rows (tokens) of each captured activation,
    #: 0 = all; ranges (the grids' starting points) always come from every row.
    search_rows: int = 0
    #: Rotate the residual stream by one orthogonal matrix, LayerNorm/LayerScale folded (docs/lowbit.md §2).
    rotate_residual: bool = False
    #: Per-head orthogonal rotations of q, k and v, folded into qkv and proj.
    rotate_heads: bool = False
    #: Online orthogonal rotation of fc2's input, folded into fc2 (needs ``gelu_twin=False``).
    rotate_fc2: bool = False
    #: ``"hadamard"`` (randomized Hadamard ⊗ small random orthogonal) or ``"orthogonal"`` (dense random).
    rotation_kind: RotationKind = "hadamard"
    rotation_seed: int = 0
    #: Linear-layer weight scales: ``"block"`` (one per layer, one per q/k/v block) or ``"channel"``.
    w_granularity: Literal["block", "channel"] = "block"
    #: ``"nearest"`` or ``"gptq"`` (second-order error compensation, docs/lowbit.md §3). GPTQ and
    #: per-channel scales calibrate linear weights from ``H = XᵀX`` instead of the alternating search.
    weight_rounding: Literal["nearest", "gptq"] = "nearest"
    #: GPTQ: fraction of ``mean(diag H)`` added to ``diag H``; columns in decreasing ``diag H`` order; block size.
    gptq_damp: float = 0.01
    gptq_act_order: bool = True
    gptq_block: int = 128
    #: GPTQ fits the weight to the layer's quantized inputs: it rounds ``W*``, the weight that maps
    #: ``q(X)`` closest to the float output ``X Wᵀ``, under ``H̃ = q(X)ᵀq(X)``, so that the weight also
    #: compensates the input quantizer's error (docs/lowbit.md §10). Needs ``weight_rounding="gptq"``.
    gptq_quantized_inputs: bool = False
    #: Post-softmax operand: ``"log2"`` / ``"log_sqrt2"`` log quantizer (docs/lowbit.md §4) instead of
    #: the twin/uniform one (``"none"``).
    softmax_log: LogQuantization = "none"
    #: Scale each row of the quantized post-softmax operand so that it sums to what the float row
    #: sums to (1): rounding a row's many small probabilities to zero otherwise removes part of its
    #: mass, and every output shrinks (docs/lowbit.md §9). A per-row factor on the product's output.
    softmax_renorm: bool = False
    #: fc2's post-GELU input: ``"log2"`` / ``"log_sqrt2"`` log quantizer with a searched largest level and the
    #: GELU twin's fixed negative step (docs/lowbit.md §8) instead of the uniform one (``"none"``); replaces
    #: ``gelu_twin``, so it needs ``gelu_twin=False``.
    gelu_log: LogQuantization = "none"
    #: Bits of the classifier head's weight and input (0: the run's w_bits/a_bits). The head's input
    #: feeds the logits directly (docs/lowbit.md §7).
    head_bits: int = 0
    #: ``"search"``: symmetric quantizers, scales from the grid search of docs/method.md §2.
    #: ``"percentile"``: RepQ-ViT's (docs/lowbit.md §6): asymmetric (zero-point) uniform quantizers,
    #: per-channel weights, each range the best of three percentile pairs by MSE, activations
    #: calibrated in forward order on the outputs of the already quantized layers.
    calibration: Literal["search", "percentile"] = "search"
    #: RepQ-ViT's reparameterization (docs/lowbit.md §6): the input of each linear layer after a
    #: LayerNorm (qkv, fc1) is calibrated per channel, then the channels' ranges are folded into the
    #: LayerNorm's affine and the layer's weight and bias, leaving one per-tensor quantizer.
    reparam_ln: bool = False
    #: Round the per-tensor zero point the fold leaves (an integer, as integer kernels need); RepQ-ViT
    #: keeps the channels' mean zero point unrounded (docs/lowbit.md §6).
    reparam_round_zero_point: bool = False
    #: Compute the fold in float64, rounded once at the end; off, it computes in the parameters'
    #: precision (at least float32) op for op as the released code does, which keeps ``repq-vit``
    #: bit-identical to it on a float32 model (docs/lowbit.md §6).
    reparam_fold_float64: bool = False
    #: The log softmax quantizer has a calibrated largest level (percentile of the probabilities) and
    #: ``2^bits`` levels plus zero, as RepQ-ViT releases it (docs/lowbit.md §6); needs ``softmax_log``.
    softmax_log_scale: bool = False
    #: Quantize the patch embedding's image input to this many bits (asymmetric, per tensor); 0: float.
    patch_input_bits: int = 0
    #: Quantize the attention matmuls ``q @ kᵀ`` and ``softmax @ v``. ``False`` keeps them float
    #: (plain matmuls, not sites; the softmax options then have no effect): runtimes run float
    #: attention in one fused kernel, as NNCF's int8 models leave it (docs/deployment.md).
    quantize_attention: bool = True
    #: SmoothQuant migration strength α for the inputs of qkv, fc1 and (without the GELU twin or log quantizer) fc2:
    #: ``x / s``, ``W diag(s)`` with ``s_j = max|x_j|^α / max|W_:j|^(1-α)`` from the calibration
    #: inputs; 0 = off (docs/deployment.md).
    smooth_alpha: float = 0.0
    #: The inputs of qkv, fc1, fc2 (without the GELU twin) and the head get an asymmetric per-tensor
    #: quantizer: a step and an integer zero point, the range ``[min(x, 0), max(x, 0)]`` on all ``2^b``
    #: codes, its width searched on the preset's grid. A one-signed input (post-GELU) then uses every
    #: code instead of half of them; runtimes take it as ``QuantizeLinear`` with a zero point
    #: (docs/deployment.md). proj's input (OpenVINO fuses only a symmetric quantizer into its fused
    #: attention kernel) and the attention operands stay symmetric.
    asymmetric_inputs: bool = False
    #: Bias correction of each linear layer: its bias is shifted by the mean output error its
    #: quantization (input and weight) causes on the calibration inputs, ``mean(x) Wᵀ - mean(q(x)) q(W)ᵀ``
    #: (docs/deployment.md). Quantization disabled then no longer gives the float biases back.
    bias_correction: bool = False

    def __post_init__(self):
        # Each field against its annotation (types, choices). The rules among the fields are the
        # recipe's: a flat preset means something only as the recipe ``from_flat`` reads it as.
        check_fields(self)

    def overrides(self) -> dict:
        """Fields that differ from the named preset this one was derived from."""
        base = Preset.named_views.get(self.name)
        if base is None:
            return {}
        mine = Preset.read_back(self)
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("name", "description") and getattr(self, f.name) != getattr(base, f.name)
                and not self._unused(f.name, getattr(base, f.name), mine)}

    def _unused(self, name: str, other, mine) -> bool:
        """Whether field ``name`` is one this preset's recipe does not use (giving it ``other`` reads back
        as the same recipe), so that it is no override even where it differs from the named preset."""
        try:
            return Preset.read_back(dataclasses.replace(self, **{name: other})) == mine
        except UserError:
            return False


#: Where each flat field lives in a recipe (docs/cli.md): a switch names the component whose
#: variant it picks, a parameter its dotted path.
FLAT_PATHS: dict[str, str] = {
    "metric": "calibration.metric", "grad_source": "calibration.metric.gradients",
    "grad_chunk": "calibration.metric.grad_chunk", "alpha": "calibration.alpha", "beta": "calibration.beta",
    "n_candidates": "calibration.n_candidates", "rounds": "calibration.rounds",
    "search_rows": "calibration.search_rows", "calibration": "calibration",
    "softmax_twin": "softmax", "softmax_twin_form": "softmax.form",
    "split_search_quantized_b": "softmax.split_search_quantized_b", "softmax_twin_top": "softmax.top",
    "softmax_log": "softmax.base",
    "softmax_renorm": "softmax.renorm", "softmax_log_scale": "calibration", "quantize_attention": "softmax",
    "gelu_twin": "gelu", "gelu_pow2": "gelu.pow2", "gelu_log": "gelu.base",
    "conv_per_channel": "weights.conv_per_channel", "w_granularity": "weights.granularity",
    "weight_rounding": "weights.rounding", "gptq_damp": "weights.rounding.damp",
    "gptq_act_order": "weights.rounding.act_order", "gptq_block": "weights.rounding.block",
    "gptq_quantized_inputs": "weights.rounding.quantized_inputs",
    "rotate_residual": "transforms.rotation.residual", "rotate_heads": "transforms.rotation.heads",
    "rotate_fc2": "transforms.rotation.fc2", "rotation_kind": "transforms.rotation.kind",
    "rotation_seed": "transforms.rotation.seed", "smooth_alpha": "transforms.smoothing.alpha",
    "reparam_ln": "transforms.ln_reparam", "reparam_round_zero_point": "transforms.ln_reparam.round_zero_point",
    "reparam_fold_float64": "transforms.ln_reparam.fold_float64", "bias_correction": "transforms.bias_correction",
    "asymmetric_inputs": "inputs", "head_bits": "head_bits", "patch_input_bits": "patch_input_bits",
}


def to_flat(recipe) -> Preset:
    """The flat view of ``recipe``: each component writes the fields it has (``flat_fields``),
    the rest keep their defaults."""
    f: dict = {"name": recipe.name, "description": recipe.description}
    for component in (recipe.calibration, recipe.weights, recipe.softmax, recipe.gelu, *recipe.transforms):
        f.update(component.flat_fields())
    if recipe.softmax.variant == "log":  # the log quantizer's largest level is calibrated by percentile calibration
        f.update(softmax_log_scale=recipe.calibration.variant == "percentile")
    f.update(asymmetric_inputs=recipe.inputs == "asymmetric", head_bits=recipe.head_bits,
             patch_input_bits=recipe.patch_input_bits)
    return Preset(**f)


__all__ = ["Preset", "FLAT_PATHS", "to_flat"]
