"""Presets: the quantization methods ptq4vit offers, as plain data.

A preset fixes how sites are quantized (twins, granularity) and how scales are searched
(metric, gradient source, candidate grid, rounds). Every ablation is a preset plus
overrides, e.g. ``get_preset("official", metric="cosine", softmax_twin=False)``.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Literal

from .errors import UserError
from .typecheck import check_fields, parse_text

# The choice fields' types: every field is checked against its annotation (ptq4vit.typecheck), so a
# choice declared as a Literal is checked against its choices, on the command line too.
Metric = Literal["cosine", "mse", "hessian"]
GradSource = Literal["kl-official", "ce-fp-label"]
RotationKind = Literal["hadamard", "orthogonal"]
ROTATION_KINDS = typing.get_args(RotationKind)
LogQuantization = Literal["none", "log2", "log_sqrt2"]


@dataclass(frozen=True)
class Preset:
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

    @property
    def gradients(self) -> "GradSource | None":
        """Where calibration's ``g = dL/dO`` comes from; None when the metric needs no gradients."""
        return self.grad_source if self.metric == "hessian" and self.calibration == "search" else None

    def __post_init__(self):
        check_fields(self)  # every field against its annotation (types, choices); the rules between them follow
        if not 0 < self.alpha < self.beta:
            raise UserError(f"need 0 < alpha < beta, got alpha={self.alpha}, beta={self.beta}")
        for name in ("n_candidates", "rounds", "grad_chunk"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.search_rows < 0:
            raise UserError(f"search_rows must be 0 (all rows) or positive, got {self.search_rows}")
        if self.softmax_renorm and not self.quantize_attention:
            raise UserError("softmax_renorm rescales the quantized post-softmax operand: it needs quantize_attention=True")
        if self.rotate_fc2 and self.gelu_twin:
            raise UserError("rotate_fc2 makes fc2's input no longer post-GELU: set gelu_twin=False with it")
        self._check_gelu_log()
        if self.head_bits != 0 and not 2 <= self.head_bits <= 8:
            raise UserError(f"head_bits must be 0 (the run's bits) or an integer from 2 to 8, got {self.head_bits!r}")
        self._check_percentile()
        if not 0 <= self.smooth_alpha <= 1:
            raise UserError(f"smooth_alpha must be in [0, 1] (0: no smoothing), got {self.smooth_alpha}")
        if self.asymmetric_inputs and self.calibration != "search":
            raise UserError("asymmetric_inputs is for calibration='search': calibration='percentile' is asymmetric everywhere")
        if self.bias_correction and self.calibration != "search":
            raise UserError("bias_correction needs calibration='search' (percentile calibration has no such step)")
        if not 0 <= self.gptq_damp or self.gptq_block < 1:
            raise UserError(f"need gptq_damp >= 0 and gptq_block >= 1, got {self.gptq_damp}, {self.gptq_block}")
        if self.gptq_quantized_inputs and (self.weight_rounding != "gptq" or self.gptq_damp <= 0):
            raise UserError(f"gptq_quantized_inputs needs weight_rounding='gptq' and gptq_damp > 0, got "
                            f"weight_rounding={self.weight_rounding!r}, gptq_damp={self.gptq_damp}")

    def _check_gelu_log(self) -> None:
        """The post-GELU log quantizer replaces the twin and needs fc2's input to be the GELU output."""
        if self.gelu_log == "none":
            return
        if self.gelu_twin:
            raise UserError(f"gelu_log={self.gelu_log!r} and gelu_twin both quantize fc2's post-GELU input: "
                            f"set gelu_twin=False with it")
        if self.rotate_fc2:
            raise UserError(f"gelu_log={self.gelu_log!r} needs fc2's input post-GELU, which rotate_fc2 rotates: "
                            f"use one of them")
        if self.calibration == "percentile":
            raise UserError(f"gelu_log={self.gelu_log!r} has no initialisation under calibration='percentile': "
                            f"use calibration='search'")

    def _check_percentile(self) -> None:
        """The RepQ-ViT fields need percentile calibration; it has no initialisation for the rest."""
        percentile = self.calibration == "percentile"
        needs = [name for name, on in (("reparam_ln", self.reparam_ln), ("softmax_log_scale", self.softmax_log_scale),
                                       ("reparam_round_zero_point", self.reparam_round_zero_point),
                                       ("reparam_fold_float64", self.reparam_fold_float64),
                                       ("patch_input_bits", self.patch_input_bits != 0)) if on]
        if needs and not percentile:
            raise UserError(f"{', '.join(needs)} need(s) calibration='percentile' (RepQ-ViT's asymmetric quantizers)")
        if self.patch_input_bits != 0 and not 2 <= self.patch_input_bits <= 8:
            raise UserError(f"patch_input_bits must be 0 (float image) or 2..8, got {self.patch_input_bits}")
        if self.softmax_log_scale and self.softmax_log == "none":
            raise UserError("softmax_log_scale needs a log softmax quantizer: set softmax_log='log_sqrt2' or 'log2'")
        if not percentile:
            return
        clash = [name for name, on in (
            ("gelu_twin", self.gelu_twin),
            ("softmax_twin (without softmax_log)", self.softmax_twin and self.softmax_log == "none"),
            ("weight_rounding='gptq'", self.weight_rounding == "gptq"),
            ("w_granularity='channel'", self.w_granularity == "channel")) if on]
        if clash:
            raise UserError(f"calibration='percentile' has no initialisation for {', '.join(clash)}: turn "
                            f"{'it' if len(clash) == 1 else 'them'} off (its weights are always per channel)")
        if self.softmax_log != "none" and not self.softmax_log_scale:
            raise UserError("calibration='percentile' calibrates the log softmax quantizer's scale: set softmax_log_scale=True")
        if self.reparam_ln and self.rotate_residual:
            raise UserError("reparam_ln folds into LayerNorm's affine, which rotate_residual folds away: use one of them")

    @property
    def second_order_weights(self) -> bool:
        """Linear weights calibrated from ``H = XᵀX`` (per-channel scales or GPTQ) instead of the PTQ4ViT search."""
        return self.weight_rounding == "gptq" or self.w_granularity == "channel"

    @property
    def rewrites_sites(self) -> bool:
        """Calibration rewrites sites' float tensors (GPTQ-rounded weights, smoothing, corrected biases),
        so capture passes after the first must be shown the float ones (``calib.run``)."""
        return self.weight_rounding == "gptq" or self.smooth_alpha > 0 or self.bias_correction

    def overrides(self) -> dict:
        """Fields that differ from the named preset this one was derived from."""
        base = PRESETS.get(self.name)
        if base is None:
            return {}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("name", "description") and getattr(self, f.name) != getattr(base, f.name)}


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset(
        name="base",
        description="BasePTQ as the released scripts run it: no twins, hessian metric with the released "
                    "(zero-loss) gradients, alpha=0.5, one round, per-tensor patch-embedding weight",
        metric="hessian", grad_source="kl-official", alpha=0.5, beta=1.2, rounds=1,
        softmax_twin=False, gelu_twin=False, gelu_pow2=False, conv_per_channel=False,
        split_search_quantized_b=False),
    Preset(
        name="base-cosine",
        description="BasePTQ as the paper's README table reports it: PTQ4ViT's grid and rounds, cosine metric, no twins",
        metric="cosine", grad_source="kl-official", softmax_twin=False, gelu_twin=False, gelu_pow2=False,
        split_search_quantized_b=False),
    Preset(
        name="official",
        description="PTQ4ViT exactly as released: hessian metric on kl(p||p) gradients, hi+lo softmax twin, "
                    "split searched with v float, free GELU twin",
        metric="hessian", grad_source="kl-official", softmax_twin_form="sum",
        split_search_quantized_b=False, gelu_pow2=False),
    Preset(
        name="ptq4vit",
        description="PTQ4ViT with the released code's defects mended: cross-entropy gradients on the float "
                    "model's labels, region-select softmax twin, v quantized in the split search, "
                    "power-of-two GELU twin",
    ),
    Preset(
        name="fast8",
        description="Deployment at 8 bits: ptq4vit's sites and twins, scales from a short grid (20 "
                    "candidates, 0.5-1.2 of the max-based step) scored by cosine similarity on 2048 "
                    "evenly spaced tokens of each activation, one round, no gradients (at 8 bits the "
                    "wide grid and the hessian metric buy little)",
        metric="cosine", alpha=0.5, beta=1.2, n_candidates=20, rounds=1, search_rows=2048,
    ),
    Preset(
        name="deploy8",
        description="Deployment at 8 bits on a runtime's int8 kernels (OpenVINO, ONNX Runtime): only the "
                    "linear layers are quantized (per-tensor activations, per-channel weights rounded to "
                    "nearest), attention stays float for the runtimes' fused attention kernels, no twins "
                    "(one integer GEMM per layer), the inputs of qkv, fc1 and fc2 smoothed (alpha 0.95; "
                    "the division folds into the LayerNorm / fc1 at run time), the inputs of qkv, fc1, fc2 "
                    "and the head asymmetric (an integer zero point), each bias corrected by the mean "
                    "output error of its layer's quantization; input scales from fast8's short cosine "
                    "grid on 2048 tokens, one pass, no gradients",
        metric="cosine", alpha=0.5, beta=1.2, n_candidates=20, rounds=1, search_rows=2048,
        softmax_twin=False, gelu_twin=False, gelu_pow2=False, quantize_attention=False,
        w_granularity="channel", smooth_alpha=0.95, asymmetric_inputs=True, bias_correction=True,
    ),
    Preset(
        name="rotq",
        description="ptq4vit's Hessian-guided search and softmax twin on a rotated model (residual stream, "
                    "per-head q/k/v, online fc2 input), with per-channel GPTQ-rounded linear weights; "
                    "a coarser grid (alpha=0.2, 50 candidates), since rotated operands have no far outliers to clip; "
                    "the classifier head at 8 bits; each quantized softmax row rescaled to its float mass; "
                    "the inputs of qkv, fc1, fc2 and the head asymmetric (an integer zero point) and each "
                    "linear layer's bias corrected by its mean output error",
        alpha=0.2, n_candidates=50, rotate_residual=True, rotate_heads=True, rotate_fc2=True, gelu_twin=False,
        w_granularity="channel", weight_rounding="gptq", head_bits=8, softmax_renorm=True,
        asymmetric_inputs=True, bias_correction=True,
    ),
    Preset(
        name="repq-vit",
        description="RepQ-ViT (Li et al., ICCV 2023) as released: asymmetric uniform quantizers with percentile "
                    "ranges calibrated in forward order on quantized inputs, per-channel weights, per-channel "
                    "post-LayerNorm ranges reparameterized into LayerNorm and qkv/fc1, a scaled log-sqrt2 "
                    "post-softmax quantizer, the image input at 8 bits",
        calibration="percentile", reparam_ln=True, softmax_twin=False, softmax_log="log_sqrt2",
        softmax_log_scale=True, gelu_twin=False, gelu_pow2=False, patch_input_bits=8,
    ),
)}

#: The six ablation rows of the paper's README: (label, overrides).
ABLATION_ROWS: dict[int, tuple[str, dict]] = {
    1: ("cosine, no twin", dict(metric="cosine", softmax_twin=False, gelu_twin=False)),
    2: ("hessian, no twin", dict(metric="hessian", softmax_twin=False, gelu_twin=False)),
    3: ("hessian, softmax twin", dict(metric="hessian", softmax_twin=True, gelu_twin=False)),
    4: ("hessian, GELU twin", dict(metric="hessian", softmax_twin=False, gelu_twin=True)),
    5: ("cosine, both twins", dict(metric="cosine", softmax_twin=True, gelu_twin=True)),
    6: ("hessian, both twins", dict(metric="hessian", softmax_twin=True, gelu_twin=True)),
}


#: One component of ``rotq`` switched off per row (docs/lowbit.md): (label, overrides of ``rotq``).
ROTQ_ABLATION_ROWS: dict[str, dict] = {
    "no rotation": dict(rotate_residual=False, rotate_heads=False, rotate_fc2=False),
    "no residual rotation": dict(rotate_residual=False),
    "no head rotation": dict(rotate_heads=False),
    "no fc2 rotation (GELU twin)": dict(rotate_fc2=False, gelu_twin=True),
    "round to nearest": dict(weight_rounding="nearest"),
    "per-block weight scales": dict(w_granularity="block"),
    "log-sqrt2 softmax": dict(softmax_log="log_sqrt2"),
    "head at the run's bits": dict(head_bits=0),
    "no softmax renormalization": dict(softmax_renorm=False),
    "symmetric inputs": dict(asymmetric_inputs=False),
    "no bias correction": dict(bias_correction=False),
}


#: One component of ``deploy8`` switched off per row (docs/deployment.md): (label, overrides of ``deploy8``).
DEPLOY_ABLATION_ROWS: dict[str, dict] = {
    "symmetric inputs": dict(asymmetric_inputs=False),
    "no bias correction": dict(bias_correction=False),
    "smoothing alpha 0.5": dict(smooth_alpha=0.5),
    "no smoothing": dict(smooth_alpha=0.0),
}


#: fc2's post-GELU input quantizer, one kind per row (docs/lowbit.md §8): (label, overrides of ``ptq4vit``).
#: The GELU twin has no row: it is ``ptq4vit`` as it is, the "(as is)" line of the report's Variants table.
POST_GELU_ROWS: dict[str, dict] = {
    "uniform": dict(gelu_twin=False),
    "log2": dict(gelu_twin=False, gelu_log="log2"),
    "log-sqrt2": dict(gelu_twin=False, gelu_log="log_sqrt2"),
}


#: One component of ``repq-vit`` switched off per row (docs/lowbit.md §6): (label, overrides of ``repq-vit``).
REPQ_ABLATION_ROWS: dict[str, dict] = {
    "no reparameterization": dict(reparam_ln=False),
    "uniform softmax": dict(softmax_log="none", softmax_log_scale=False),
    "float image": dict(patch_input_bits=0),
    "rounded zero point": dict(reparam_round_zero_point=True),
}

#: Each preset's named variants (one component switched off or swapped): the rows of its ablation.
VARIANT_ROWS: dict[str, dict[str, dict]] = {
    "rotq": ROTQ_ABLATION_ROWS, "repq-vit": REPQ_ABLATION_ROWS, "ptq4vit": POST_GELU_ROWS,
    "deploy8": DEPLOY_ABLATION_ROWS,
}


def get_preset(preset: "str | Preset", **overrides) -> Preset:
    """A preset by name (or a Preset), with fields overridden; unknown names and fields raise UserError."""
    if isinstance(preset, Preset):
        base = preset
    else:
        try:
            base = PRESETS[preset]
        except KeyError:
            raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}") from None
    fields = {f.name for f in dataclasses.fields(Preset)} - {"name", "description"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UserError(f"unknown preset field(s) {', '.join(unknown)}; valid fields: {', '.join(sorted(fields))}")
    return dataclasses.replace(base, **overrides) if overrides else base


def parse_field(name: str, text: str):
    """``text`` (as written on a command line) as a value of the Preset field ``name``.

    The field's declared type decides, so ``gelu_twin=0`` and ``gelu_twin=false`` give the same
    preset (and the same run key).
    """
    hints = typing.get_type_hints(Preset)
    if name not in hints or name in ("name", "description"):
        fields = sorted(set(hints) - {"name", "description"})
        raise UserError(f"unknown preset field {name!r}; valid fields: {', '.join(fields)}")
    return parse_text(f"preset field {name}", text, hints[name])
