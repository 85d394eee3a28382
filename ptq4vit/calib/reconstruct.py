"""Block reconstruction after calibration: learned weight rounding and activation steps (docs/lowbit.md §11).

:func:`reconstruct` takes a calibrated :class:`~ptq4vit.quantized.QuantizedModel` and, unit by unit
(each transformer block, or each residual branch: :mod:`.units`), learns what makes the unit's
quantized output closest to its float output on a pool of images (the float model's: where calibration
replaced a layer's weight or bias, GPTQ's rounding or bias correction, it kept the float one for this):

* the rounding of every weight of its linear sites, up or down on the calibrated grid (by the sign of
  its gradient on the hard rounding, or AdaRound's annealed soft rounding: ``rounding``),
  written back at the end as ``codes · Δ`` (as GPTQ writes its rounding), so a checkpoint stores
  ordinary codes and scales and the integer export is unchanged in kind;
* the steps of its activation quantizers (LSQ), written back into their buffers;
* with ``learn_bias``, the biases of its linear layers (float in every export);

against the unit's output error (the last unit's optionally over only what the classifier reads of it:
``last_unit``), optionally weighted by a diagonal Fisher (the squared gradient of the float model's
loss at the unit's output) and with QDrop. With ``network_iterations``, a last
stage learns the same at every site of the model at once against the KL divergence of the model's
output from the float model's (with ``network_rounding``, the rounding going on from where the units
left it). The learning happens on stand-ins swapped into the unit's sites for the duration
(:mod:`ptq4vit.quant.learning`); the model's own forward is never changed, so a model that is not
reconstructed computes what it always did.

What it holds at once (``memory_budget``): the pool's inputs of the current unit in float32, as the
quantized model computes them (``inputs="quantized"``) and as the float model does, and the unit's
float outputs: 3 activations per image (2 with ``inputs="float"``), plus, with ``fisher``, the
squared gradients at every unit's output in bfloat16 (half an activation per unit and image).
Nothing of the previous units is kept. The network stage holds the float model's class
log-probabilities of the pool. The optimization's own graph (one batch through one block, or through
the model in the network stage) and the float weights calibration kept (one copy of the replaced
layers' weights) are not counted.

Reproducible: batches and QDrop masks are drawn from generators seeded by ``seed``, and the work
runs on a fixed number of intra-op threads, so the same inputs give a bit-identical model.
"""
from __future__ import annotations

import logging
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import UnsupportedModelError, UserError
from ..models import DEFAULT_ADAPTERS, AdapterRegistry
from ..quant import Quantizer
from ..quant.learning import (ROUNDING_LEARNERS, STEP_RULES, WEIGHT_GRIDS, LearningActivation, LearningWeight,
                              SignRoundingWeight, rounding_regularizer)
from ..quantized import QuantizedModel
from ..recipes.reconstruction import Reconstruction
from ..typecheck import check_arguments
from .budget import default_memory_budget
from .capture import frozen_parameters
from .run import default_workers, intra_op_threads
from .units import Unit, bind_block_arguments, reconstruction_units

logger = logging.getLogger(__name__)


@dataclass
class UnitResult:
    """A unit's output error relative to its float output (``Σ (y - t)² / Σ t²`` over the pool, each term
    weighted by the Fisher with ``fisher``; of the features the classifier reads for the last unit with
    ``last_unit="features"``: the error it learns against), before and after; ``kept`` is
    False where learning raised it and the unit was restored."""

    name: str
    error_before: float
    error_after: float
    kept: bool


@dataclass
class NetworkResult:
    """The network stage's steps and the mean KL(float ‖ quantized) of the model's output over the pool,
    before and after; ``kept`` is False where learning raised it and the model was restored."""

    iterations: int
    kl_before: float
    kl_after: float
    kept: bool


@dataclass
class ReconstructionReport:
    """What :func:`reconstruct` did: per unit errors, the network stage's KL (None without one), the pool
    size, and the quantizers held fixed by kind."""

    units: list[UnitResult] = field(default_factory=list)
    images: int = 0
    #: What the last unit learned against: ``"features"`` (what the classifier reads) or ``"output"``.
    last_unit: str = "output"
    held_fixed: dict[str, int] = field(default_factory=dict)
    network: Optional[NetworkResult] = None

    def restored(self) -> list[str]:
        """The units (and ``"network"`` for the network stage) restored as they were: learning raised their error."""
        return [u.name for u in self.units if not u.kept] + (
            ["network"] if self.network is not None and not self.network.kept else [])

    def as_dict(self) -> dict:
        """Plain data for a results row: the pool size, each unit's errors and whether it was kept, the network
        stage's KL, the kinds held fixed."""
        return asdict(self)

    def summary(self) -> str:
        restored = self.restored()
        lines = [f"reconstructed {len(self.units)} unit(s) on {self.images} image(s)"
                 + (", the last against the classifier's features" if self.last_unit == "features" else "")
                 + (f", {len(restored)} restored as calibrated" if restored else "")]
        lines += [f"  {u.name}: error {u.error_before:.4g} -> {u.error_after:.4g}" + ("" if u.kept else " (restored)")
                  for u in self.units]
        if self.network is not None:
            n = self.network
            lines.append(f"  network ({n.iterations} steps): output KL {n.kl_before:.4g} -> {n.kl_after:.4g}"
                         + ("" if n.kept else " (restored)"))
        if self.held_fixed:
            lines.append("  held fixed: " + ", ".join(f"{n} {k}" for k, n in sorted(self.held_fixed.items())))
        return "\n".join(lines)


class _Stop(Exception):
    """Raised by a pre-hook to end a model pass at the block whose input it captured."""


def _block_inputs(model: nn.Module, block: nn.Module, images: torch.Tensor, batch: int) -> torch.Tensor:
    """The input of ``block`` for every image, from passes of ``model`` that stop there."""
    out: Optional[torch.Tensor] = None

    def hook(module, args):
        raise _Stop(args[0])

    handle = block.register_forward_pre_hook(hook)
    try:
        for i in range(0, len(images), batch):
            try:
                model(images[i:i + batch])
            except _Stop as stop:
                x = stop.args[0].detach()
                if out is None:
                    out = x.new_empty((len(images), *x.shape[1:]))
                out[i:i + len(x)] = x
            else:
                raise RuntimeError("the model's forward never reached the block it was to stop at")
    finally:
        handle.remove()
    return out


def _run(unit: Unit, x: torch.Tensor, batch: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``unit.forward`` over ``x`` in batches, into ``out`` (which may be ``x`` itself)."""
    for i in range(0, len(x), batch):
        y = unit.forward(x[i:i + batch])
        if out is None:
            out = y.new_empty((len(x), *y.shape[1:]))
        out[i:i + len(y)] = y
    return out


def _relative_error(unit: Unit, x: torch.Tensor, target: torch.Tensor, batch: int,
                    weights: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None) -> float:
    """``Σ w (y - t)² / Σ w t²`` over the pool: the error the unit learns against (``w`` = 1 without Fisher);
    the outputs ``y`` are written into ``out`` if given (the next unit's inputs, without a second pass)."""
    err = ref = 0.0
    for i in range(0, len(x), batch):
        y = unit.forward(x[i:i + batch])
        if out is not None:
            out[i:i + len(y)] = y
        t = target[i:i + batch].to(torch.float64)
        w = 1.0 if weights is None else weights[i:i + batch].to(torch.float64)
        err += float(((y.to(torch.float64) - t).square() * w).sum())
        ref += float((t.square() * w).sum())
    return err / max(ref, torch.finfo(torch.float64).tiny)


def _replaced_parameters(qmodel: QuantizedModel) -> list[tuple[str, nn.Parameter, Optional[torch.Tensor]]]:
    """``(name, parameter, float value)`` of every weight and bias calibration replaced (GPTQ's rounded
    weights, bias correction's biases); the float value is None where it was not kept."""
    recipe = qmodel.recipe
    roles = (["weight"] if recipe.weights.rounding.variant == "gptq" else []) + (
        ["bias"] if recipe.transform("bias_correction") is not None else [])
    replaced = []
    for name, site in qmodel.sites().items():
        for role in roles:
            if hasattr(site, f"float_{role}") and getattr(site, role, None) is not None:
                replaced.append((f"{name}.{role}", getattr(site, role), getattr(site, f"float_{role}")))
    return replaced


@contextmanager
def _float_model(qmodel: QuantizedModel, replaced: list) -> Iterator[None]:
    """The float model: every quantizer off and the float weights and biases swapped in where calibration
    replaced them (turning the quantizers off alone would keep GPTQ's rounding and the corrected biases)."""
    swapped = []
    try:
        with qmodel.quantization_disabled():
            for _, param, value in replaced:
                swapped.append((param, param.data))
                param.data = value
            yield
    finally:
        for param, data in swapped:
            param.data = data


def _fisher_weights(qmodel: QuantizedModel, images: torch.Tensor, units: list[Unit], batch: int,
                    replaced: list) -> list[torch.Tensor]:
    """Per unit, the squared gradient at its output (bfloat16: the range of float32 at half the memory) of
    the float model's summed cross-entropy against its own predictions, for every image."""
    grads: list[Optional[torch.Tensor]] = [None] * len(units)
    where = {"first": 0}

    def make_hook(k: int):
        def hook(module, inputs, output):
            first = where["first"]

            def store(g):
                if grads[k] is None:
                    grads[k] = g.new_empty((len(images), *g.shape[1:]), dtype=torch.bfloat16)
                grads[k][first:first + len(g)] = g.detach().square()
            output.register_hook(store)
        return hook

    handles = [u.grad_at.register_forward_hook(make_hook(k)) for k, u in enumerate(units)]
    try:
        with _float_model(qmodel, replaced), torch.enable_grad():
            for i in range(0, len(images), batch):
                where["first"] = i
                x = images[i:i + batch].detach().clone().requires_grad_(True)
                logits = qmodel(x)
                F.cross_entropy(logits, logits.detach().argmax(-1), reduction="sum").backward()
    finally:
        for h in handles:
            h.remove()
    return grads


@dataclass
class _Learners:
    weights: list[tuple[nn.Module, Union[LearningWeight, SignRoundingWeight]]] = field(default_factory=list)
    activations: list[LearningActivation] = field(default_factory=list)
    biases: list[nn.Parameter] = field(default_factory=list)


@contextmanager
def _learning(unit: Unit, options: Reconstruction, generator: torch.Generator,
              held_fixed: Counter) -> Iterator[_Learners]:
    """Swap learning stand-ins into the unit's sites; put the quantizers back on exit."""
    learners = _Learners()
    swapped: list[tuple[nn.Module, str, Quantizer]] = []
    try:
        for site in unit.sites().values():
            bias = getattr(site, "bias", None)
            if options.learn_bias and isinstance(bias, nn.Parameter):
                learners.biases.append(bias.requires_grad_(True))  # frozen again on exit
            for role, q in site.quantizers().items():
                if role == "w_quant":
                    grid = WEIGHT_GRIDS.find(q)
                    if not options.learn_rounding or grid is None:
                        if grid is None:
                            held_fixed[type(q).__name__ + " weight"] += 1
                        continue  # the weight is not learned: the quantizer rounds it as calibrated
                    start = getattr(site, "rounding_start", None)  # GPTQ's unrounded weight, where calibration kept it
                    start = site.weight if start is None else start
                    step = {"learn_step": True} if options.learn_weight_steps else {}  # a sign rounding's option
                    stand_in: nn.Module = ROUNDING_LEARNERS[options.rounding](q, start, grid(q, site.weight), **step)
                    learners.weights.append((site, stand_in))
                else:
                    rule = STEP_RULES.find(q)
                    if rule is not None and not rule.learnable(q):
                        rule = None
                    learn = options.learn_steps and rule is not None and (
                        rule.family == "uniform" or options.learn_twin_log)
                    if not learn:
                        held_fixed[type(q).__name__] += 1
                    stand_in = LearningActivation(q, rule, learn, generator)
                    learners.activations.append(stand_in)
                setattr(site, role, stand_in)
                swapped.append((site, role, q))
        yield learners
    finally:
        for site, role, q in reversed(swapped):
            setattr(site, role, q)
        for bias in learners.biases:
            bias.requires_grad_(False)
            bias.grad = None


def _snapshot(unit: Unit) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tensor, copy) of every weight, bias and quantizer buffer of the unit's sites, to restore a unit."""
    kept = []
    for site in unit.sites().values():
        for name in ("weight", "bias"):
            if getattr(site, name, None) is not None:
                kept.append((getattr(site, name).data, getattr(site, name).detach().clone()))
        for q in site.quantizers().values():
            kept += [(b, b.clone()) for b in q.buffers()]
    return kept


def _learn(unit: Unit, options: Reconstruction, iterations: int, loss_of: Callable[[torch.Tensor], torch.Tensor],
           n: int, batches: torch.Generator, drops: torch.Generator, held_fixed: Counter, bar,
           keep_unrounded: bool = False) -> list[tuple[nn.Module, torch.Tensor]]:
    """Optimize the unit's stand-ins for ``iterations`` steps, each on ``loss_of`` a batch of pool indices,
    then write the hard rounding and the learned steps; with ``keep_unrounded``, returns each sign-rounded
    site with the weight its rounding rounds (where a later stage goes on learning it)."""
    unrounded = []
    with _learning(unit, options, drops, held_fixed) as learners:
        v = [w.v for _, w in learners.weights]
        u = [a.u for a in learners.activations if a.u is not None] + [
            w.s for _, w in learners.weights if w.s is not None]  # activation and weight log-steps
        b = learners.biases
        sign = options.rounding == "sign"  # the sign rounding moves V itself; Adam moves the rest
        groups = ([{"params": v, "lr": options.lr_rounding}] if v and not sign else []) + (
            [{"params": u, "lr": options.lr_steps}] if u else []) + ([{"params": b, "lr": options.lr_bias}] if b else [])
        n_weights = sum(p.numel() for p in v)
        if v or u or b:
            opt = torch.optim.Adam(groups) if groups else None
            for a in learners.activations:
                a.drop = options.qdrop
            for it in range(iterations):
                idx = torch.randint(n, (options.batch_size,), generator=batches)
                with torch.enable_grad():
                    loss = loss_of(idx)
                    beta = None if sign else options.beta(it)
                    if beta is not None and v and options.rounding_weight > 0:
                        reg = sum(rounding_regularizer(p, beta) for p in v) / n_weights
                        loss = loss + options.rounding_weight * reg
                    for p in v + u + b:
                        p.grad = None
                    loss.backward()
                if opt is not None:
                    opt.step()
                if sign:  # the rate falls linearly to 0 over the iterations (SignRound's schedule)
                    lr = options.lr_rounding * (1.0 - it / iterations)
                    for _, w in learners.weights:
                        w.sign_step(lr)
                bar.update(1)
                if it % 10 == 0 or it == iterations - 1:
                    bar.set_postfix_str(f"{unit.name} loss {float(loss):.4g}", refresh=False)
        else:
            bar.update(iterations)
        if keep_unrounded:
            unrounded = [(site, w.unrounded()) for site, w in learners.weights]  # sign roundings (the recipe checks)
    # the quantizers are back in place: write what was learned into them
    with torch.no_grad():
        for site, w in learners.weights:
            q = w.quantizer
            codes, scale = w.hard_codes(), w.learned_scale()
            if scale is not None:
                q.scale.copy_(scale)
            site.weight.copy_(q.dequantize(codes, site.weight.dtype))
        for a in learners.activations:
            step = a.learned_step()
            if step is not None:
                getattr(a.quantizer, a.rule.buffer).copy_(step)
    return unrounded


def _unit_loss(unit: Unit, x_in: torch.Tensor, target: torch.Tensor,
               fisher: Optional[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The unit's output error on a batch, relative to the target's mean square (Fisher-weighted if given)."""
    mean_square = float(target.to(torch.float64).square().mean())
    fisher_scale = float(fisher.to(torch.float64).mean()) if fisher is not None else 1.0

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        idx = idx.to(x_in.device)
        diff = (unit.forward(x_in[idx]) - target[idx]).square()
        if fisher is not None:
            diff = diff * (fisher[idx].to(diff.dtype) / fisher_scale)
        return diff.mean() / mean_square
    return loss_of


def _output_kl(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, float_log_probs: torch.Tensor,
               batch: int) -> float:
    """Mean over ``images`` of KL(float ‖ model) between the class distributions."""
    total = 0.0
    for i in range(0, len(images), batch):
        log_q = F.log_softmax(model(images[i:i + batch]).to(torch.float64), dim=-1)
        total += float(F.kl_div(log_q, float_log_probs[i:i + batch].to(torch.float64), reduction="sum",
                                log_target=True))
    return total / len(images)


def _float_log_probs(qmodel: QuantizedModel, pool: torch.Tensor, replaced: list, batch: int) -> torch.Tensor:
    """The float model's class log-probabilities of the pool: taken before any unit is learned, as a unit
    writes its quantized weights over float ones calibration kept no copy of."""
    with _float_model(qmodel, replaced):
        return torch.cat([F.log_softmax(qmodel(pool[i:i + batch]), dim=-1) for i in range(0, len(pool), batch)])


def _learn_network(qmodel: QuantizedModel, pool: torch.Tensor, float_log_probs: torch.Tensor,
                   options: Reconstruction, batches: torch.Generator, drops: torch.Generator, held_fixed: Counter,
                   bar) -> "NetworkResult":
    """The network stage: every site of the model at once, against the KL of its output from the float
    model's; the model is restored where the pool's KL would rise."""
    batch = options.batch_size
    model = qmodel.model
    whole = Unit("network", qmodel, (model,), model, "", False)
    rounding = options.network_learns_rounding()
    stage = options.with_changes(learn_rounding=rounding, learn_weight_steps=options.learn_weight_steps and rounding,
                                 lr_rounding=options.network_lr_rounding, lr_steps=options.network_lr_steps)

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        idx = idx.to(pool.device)
        log_q = F.log_softmax(qmodel(pool[idx]), dim=-1)
        return F.kl_div(log_q, float_log_probs[idx], reduction="batchmean", log_target=True)

    before = _output_kl(qmodel, pool, float_log_probs, batch)
    saved = _snapshot(whole)
    held_here: Counter = Counter()
    _learn(whole, stage, options.network_iterations, loss_of, len(pool), batches, drops, held_here, bar)
    for kind, count in held_here.items():  # each quantizer once: the units have counted those of the blocks
        held_fixed[kind] = max(held_fixed[kind], count)
    after = _output_kl(qmodel, pool, float_log_probs, batch)
    kept = after <= before
    if not kept:
        for tensor, copy in saved:
            tensor.copy_(copy)
        after = before
    return NetworkResult(options.network_iterations, before, after, kept)


def _last_unit_reads(model: nn.Module, options: Reconstruction,
                     adapters: AdapterRegistry) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """What the classifier reads of the last unit's output, where the last unit learns against it (None: its
    whole output). ``"features"`` refuses a family that does not state them; ``"auto"`` then takes the output."""
    if options.last_unit == "output" or (options.last_unit == "auto" and options.fisher):
        return None  # (the Fisher weights the whole output)
    try:
        return adapters.adapter_for(model).head_features(model)
    except UnsupportedModelError:
        if options.last_unit == "features":
            raise
        return None


def reconstruct(qmodel: QuantizedModel, images: torch.Tensor, options: Reconstruction = Reconstruction(), *,
                progress: bool = True, threads: Optional[int] = None, memory_budget: Optional[int] = None,
                adapters: AdapterRegistry = DEFAULT_ADAPTERS) -> ReconstructionReport:
    """Reconstruct a calibrated model block by block, in place (docs/lowbit.md §11); returns what it did.

    Args:
        qmodel: a calibrated float32 model (``ptq4vit.quantize``); its weights and activation steps
            are rewritten, its structure, quantizer kinds and bits are not. Where its recipe replaced
            weights or biases (GPTQ, bias correction) it must have been quantized with the recipe's
            reconstruction set, which keeps the float ones (else UserError).
        images: float tensor ``(N, 3, H, W)`` transformed like eval images; the first
            ``options.images`` of them are the pool.
        options: what is learned and for how long (:class:`Reconstruction`).
        progress: show a progress bar over units and iterations, with the current loss.
        threads: CPU intra-op threads for the whole run (default: torch's setting capped by the
            CPUs this process may use); torch's setting is restored afterwards.
        memory_budget: bytes the cached activations may take (default: as ``quantize``'s); a pool
            that does not fit raises UserError before anything is changed.
        adapters: the model families known (default: the shipped ones); the model's adapter states its
            blocks (the units) and, with ``last_unit="features"``, what its classifier reads of the last
            block's output, or refuses.

    A unit whose output error on the pool would rise is restored as it was (``kept=False``).
    """
    check_arguments(reconstruct, dict(qmodel=qmodel, images=images, options=options, progress=progress,
                                      threads=threads, memory_budget=memory_budget, adapters=adapters))
    if images.dim() != 4 or not images.is_floating_point() or len(images) == 0:
        raise UserError(f"images must be a non-empty float tensor of shape (N, 3, H, W), got {tuple(images.shape)} "
                        f"of {images.dtype}")
    if threads is not None and threads < 1:
        raise UserError(f"threads must be a positive integer, got {threads}")
    model = qmodel.model
    params = [p for p in model.parameters() if p.is_floating_point()]
    if any(p.dtype != torch.float32 for p in params):
        raise UserError(f"reconstruct needs a float32 model, got parameters of {params[0].dtype if params else None}")
    uncalibrated = [type(q).__name__ for q in qmodel.quantizers() if q.enabled and not q.calibrated]
    if uncalibrated:
        raise UserError(f"reconstruct needs a calibrated model (ptq4vit.quantize first): {len(uncalibrated)} "
                        f"quantizer(s) were never calibrated, first a {uncalibrated[0]}")
    replaced = _replaced_parameters(qmodel)
    missing = [name for name, _, value in replaced if value is None]
    if missing:
        raise UserError(f"reconstruct learns against the float model, but calibration replaced {len(missing)} "
                        f"weight(s) or bias(es) (GPTQ's rounding, bias correction) without keeping the float "
                        f"ones, first {missing[0]}: quantize with the recipe's reconstruction set "
                        f"(reconstruction='learned'), which keeps them")
    device = params[0].device
    pool = images[:options.images].to(device=device, dtype=torch.float32)
    units = reconstruction_units(model, options.unit, adapters)
    read = _last_unit_reads(model, options, adapters)  # refused here, before any pass
    batch = options.batch_size
    budget = memory_budget if memory_budget is not None else default_memory_budget(device)
    report = ReconstructionReport(images=len(pool), last_unit="output" if read is None else "features")
    held_fixed: Counter = Counter()
    batches = torch.Generator().manual_seed(options.seed)
    drops = torch.Generator(device=device).manual_seed(options.seed + 1)
    blocks = dict(model.named_modules())

    with intra_op_threads(threads if threads is not None else default_workers(device)), \
            frozen_parameters(model), torch.no_grad():
        units = bind_block_arguments(model, units, pool)
        if read is not None:  # the last unit learns against what the classifier reads of its output
            units[-1] = replace(units[-1], forward=lambda x, last=units[-1].forward: read(last(x)))
        probe = _block_inputs(model, blocks[units[0].block], pool[:1], 1)
        per_image = probe.numel() * probe.element_size()
        held = per_image * len(pool) * (3 if options.inputs == "quantized" else 2)
        held += per_image // 2 * len(pool) * len(units) if options.fisher else 0
        if held > budget:
            raise UserError(f"reconstruction on {len(pool)} images holds {held / 2 ** 20:.0f} MiB of activations, "
                            f"above the memory budget of {budget / 2 ** 20:.0f} MiB: use fewer images "
                            f"(Reconstruction(images=...)) or a larger memory_budget")
        fisher = _fisher_weights(qmodel, pool, units, batch, replaced) if options.fisher else [None] * len(units)
        float_log_probs = _float_log_probs(qmodel, pool, replaced, batch) if options.network_iterations else None
        network_rounding = options.network_learns_rounding()
        bar = tqdm(total=len(units) * options.iterations + options.network_iterations, desc="reconstructing",
                   unit="it", disable=not progress)
        x_float = x_quant = None
        for k, unit in enumerate(units):
            if not unit.chained:
                with _float_model(qmodel, replaced):
                    x_float = _block_inputs(model, blocks[unit.block], pool, batch)
                if options.inputs == "quantized":
                    x_quant = _block_inputs(model, blocks[unit.block], pool, batch)
            with _float_model(qmodel, replaced):
                target = _run(unit, x_float, batch)
            x_in = x_quant if options.inputs == "quantized" else x_float
            before = _relative_error(unit, x_in, target, batch, fisher[k])
            saved = _snapshot(unit)
            unrounded = _learn(unit, options, options.iterations, _unit_loss(unit, x_in, target, fisher[k]),
                               len(x_in), batches, drops, held_fixed, bar, keep_unrounded=network_rounding)
            # with quantized inputs the float inputs are spent (the target is computed): their buffer takes
            # the learned unit's outputs, the next unit's inputs if it is kept, and the memory stays 3 activations
            chains = options.inputs == "quantized" and k + 1 < len(units)
            after = _relative_error(unit, x_in, target, batch, fisher[k], out=x_float if chains else None)
            kept = after <= before
            if not kept:
                for tensor, copy in saved:
                    tensor.copy_(copy)
                after = before
                if chains:
                    _run(unit, x_quant, batch, out=x_quant)  # in place: batches are independent
            else:
                if chains:
                    x_quant = x_float
                for site, weight in unrounded:  # the network stage goes on from here
                    site.rounding_start = weight
            del saved, unrounded
            fisher[k] = None
            report.units.append(UnitResult(unit.name, before, after, kept))
            x_float = target
        del x_float, x_quant, target, x_in
        if options.network_iterations:
            report.network = _learn_network(qmodel, pool, float_log_probs, options, batches, drops, held_fixed, bar)
        bar.close()
    for site in qmodel.sites().values():  # the unrounded and float weights are spent (and would only hold memory)
        for spent in ("rounding_start", "float_weight", "float_bias"):
            if getattr(site, spent, None) is not None:
                setattr(site, spent, None)
    report.held_fixed = dict(held_fixed)
    logger.info("%s", report.summary())
    return report


__all__ = ["NetworkResult", "Reconstruction", "ReconstructionReport", "UnitResult", "reconstruct"]
