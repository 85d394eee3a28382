"""The units a reconstruction optimizes one at a time: a model's transformer blocks, or their sub-blocks.

The blocks are those the model's family adapter states (``Adapter.blocks``: timm's ``blocks.i``,
torchvision's ``encoder.layers.encoder_layer_i``, ...). Within a ``nn.Sequential`` each block's
input is the previous block's output, so the reconstruction carries its cached inputs from one
block to the next; the first block of each (and any block of a ``ModuleList``) gets its input from
a pass of the model (``chained=False``).

``unit="sublayer"`` splits a block into its residual branches where a split is registered for
its class (:data:`SUBLAYER_SPLITS`): timm's pre-norm ``Block`` into ``x + ls1(attn(norm1(x)))``
and ``x + ls2(mlp(norm2(x)))``, whose composition is the block's forward exactly.

Some models call their blocks with more than the tokens: EVA passes its rotary embedding, BEiT its
shared relative position bias. :func:`bind_block_arguments` records what each block is called with
in a pass of the model and makes its unit call it so; arguments that change with the batch, or a
split of a block called with any, are refused (a unit called without them would learn another function).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import nn
# Imported from vision_transformer (not timm.layers, which gained it after 1.0.3, the floor)
from timm.models.vision_transformer import Block

from ..errors import UserError
from ..models import DEFAULT_ADAPTERS, AdapterRegistry
from ..nn import QUANT_MODULES
from ..quant import KindRegistry


@dataclass(frozen=True)
class Unit:
    """One reconstruction unit.

    ``name``: its module path (``blocks.3``, or ``blocks.3.attn`` / ``blocks.3.mlp`` for a sub-block);
    ``forward``: its function of its input; ``modules``: what holds its sites; ``grad_at``: the module
    whose output's gradient is the gradient of the unit's output (its Fisher weights); ``block``: the
    path of the block it belongs to (where a model pass captures its input); ``chained``: its input is
    the previous unit's output.
    """

    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    modules: tuple[nn.Module, ...]
    grad_at: nn.Module
    block: str
    chained: bool

    def sites(self) -> dict[str, nn.Module]:
        """Its quantization sites, by path relative to the unit's modules, in model order."""
        return {f"{i}.{n}": m for i, mod in enumerate(self.modules) for n, m in mod.named_modules()
                if isinstance(m, QUANT_MODULES)}


#: ``split(path, block, chained) -> units`` per block class, for ``unit="sublayer"``.
SUBLAYER_SPLITS: KindRegistry[Callable[[str, nn.Module, bool], list[Unit]]] = KindRegistry("sublayer split")


@SUBLAYER_SPLITS.registering(Block)
def _split_pre_norm_block(path: str, blk: Block, chained: bool) -> list[Unit]:
    # timm's Block.forward, branch by branch (attn_mask None, is_causal False: a ViT classifier's call)
    def attention(x):
        return x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))

    def mlp(x):
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))

    # the gradient at ls1/ls2's output is the gradient at the residual sum it is added to
    return [Unit(f"{path}.attn", attention, (blk.norm1, blk.attn, blk.ls1), blk.ls1, path, chained),
            Unit(f"{path}.mlp", mlp, (blk.norm2, blk.mlp, blk.ls2), blk.ls2, path, True)]


def model_blocks(model: nn.Module, paths: list[str]) -> list[tuple[str, nn.Module, bool]]:
    """``(path, block, chained)`` for every block of ``paths`` that holds quantization sites, in model order;
    ``chained``: the block follows the previous one in the same ``nn.Sequential``, which feeds it its output."""
    modules = dict(model.named_modules())
    found = []
    previous = None
    for path in paths:
        block = modules[path]
        if not any(isinstance(m, QUANT_MODULES) for m in block.modules()):
            previous = None
            continue
        parent, _, name = path.rpartition(".")
        siblings = [n for n, _ in modules[parent].named_children()]
        index = siblings.index(name)
        chained = (isinstance(modules[parent], nn.Sequential) and index > 0
                   and previous == f"{parent}.{siblings[index - 1]}")
        found.append((path, block, chained))
        previous = path
    return found


def reconstruction_units(model: nn.Module, unit: str, adapters: AdapterRegistry = DEFAULT_ADAPTERS) -> list[Unit]:
    """The units of ``model``: the blocks its family adapter states (``unit="block"``) or their sub-blocks
    (``"sublayer"``); UnsupportedModelError naming the family where the adapter states none."""
    blocks = model_blocks(model, adapters.adapter_for(model).blocks(model))
    if not blocks:
        raise UserError(f"{type(model).__name__} has no blocks with quantization sites to reconstruct")
    units: list[Unit] = []
    for path, blk, chained in blocks:
        if unit == "block":
            units.append(Unit(path, blk, (blk,), blk, path, chained))
            continue
        split = SUBLAYER_SPLITS.find(blk)
        if split is None:
            raise UserError(f"reconstruction unit 'sublayer' does not know how to split block {path!r} "
                            f"({type(blk).__name__}); use unit='block'")
        units.extend(split(path, blk, chained))
    return units


def _block_calls(model: nn.Module, paths: list[str], images: torch.Tensor) -> dict[str, tuple[tuple, dict, Any]]:
    """What each block of ``paths`` is called with besides its input, and what it returns, in one pass of
    ``model`` over ``images``."""
    modules = dict(model.named_modules())
    calls: dict[str, tuple[tuple, dict, Any]] = {}

    def recorder(path: str):
        def hook(module, args, kwargs, output):
            calls.setdefault(path, (tuple(args[1:]), dict(kwargs), output))
        return hook

    handles = [modules[path].register_forward_hook(recorder(path), with_kwargs=True) for path in paths]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def bind_block_arguments(model: nn.Module, units: list[Unit], image: torch.Tensor) -> list[Unit]:
    """``units`` whose blocks the model calls with arguments besides their input (EVA's rotary embedding,
    BEiT's shared relative position bias) call them with those arguments, recorded in passes of ``model``
    over ``image`` (one image) once and twice; UserError naming the block where one differs between the
    passes (it depends on the images), where a split unit would drop them, and where the block is not
    called or returns something other than its tokens (Hugging Face's Swin layers return tuples)."""
    paths = list(dict.fromkeys(u.block for u in units))
    once = _block_calls(model, paths, image[:1])
    twice = _block_calls(model, paths, torch.cat([image[:1]] * 2))
    blocks = dict(model.named_modules())
    bound = []
    for unit in units:
        block = blocks[unit.block]
        if unit.block not in once:
            raise UserError(f"block {unit.block!r} ({type(block).__name__}) is not called in a pass of the model: "
                            f"reconstruction cannot learn it")
        args, kwargs, output = once[unit.block]
        if not isinstance(output, torch.Tensor):
            raise UserError(f"block {unit.block!r} ({type(block).__name__}) returns a {type(output).__name__}, not "
                            f"its tokens: reconstruction cannot replay it (use reconstruction='none')")
        if not args and not kwargs:
            bound.append(unit)
            continue
        args2, kwargs2, _ = twice[unit.block]
        if not (_same(args, args2) and _same(kwargs, kwargs2)):
            names = [*(f"argument {i + 1}" for i in range(len(args))), *kwargs]
            first = next((n for n, a, b in zip(names, (*args, *kwargs.values()), (*args2, *kwargs2.values()))
                          if not _same(a, b)), "its arguments")
            raise UserError(f"block {unit.block!r} ({type(block).__name__}) is called with {first!r}, which "
                            f"changes with the images: reconstruction replays a block on cached inputs and "
                            f"cannot reproduce it")
        passed = [*(f"argument {i + 1}" for i, a in enumerate(args) if a is not None),
                  *(name for name, value in kwargs.items() if value is not None)]
        if unit.name != unit.block and passed:
            raise UserError(f"reconstruction unit 'sublayer' cannot split block {unit.block!r} "
                            f"({type(block).__name__}): the model calls it with {', '.join(map(repr, passed))} "
                            f"besides its input; use unit='block'")
        bound.append(replace(unit, forward=lambda x, block=block, args=args, kwargs=kwargs: block(x, *args, **kwargs)))
    return bound


__all__ = ["SUBLAYER_SPLITS", "Unit", "bind_block_arguments", "model_blocks", "reconstruction_units"]
