"""The units a reconstruction optimizes one at a time: a model's transformer blocks, or their sub-blocks.

A block is a child of a ``nn.Sequential`` or ``nn.ModuleList`` named ``blocks`` (timm's ViT, DeiT
and Swin stages all keep theirs so) that holds quantization sites. Within a ``nn.Sequential``
each block's input is the previous block's output, so the reconstruction carries its cached
inputs from one block to the next; the first block of each (and any block of a ``ModuleList``)
gets its input from a pass of the model (``chained=False``).

``unit="sublayer"`` splits a block into its residual branches where a split is registered for
its class (:data:`SUBLAYER_SPLITS`): timm's pre-norm ``Block`` into ``x + ls1(attn(norm1(x)))``
and ``x + ls2(mlp(norm2(x)))``, whose composition is the block's forward exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
# Imported from vision_transformer (not timm.layers, which gained it after 1.0.3, the floor)
from timm.models.vision_transformer import Block

from ..errors import UserError
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


def model_blocks(model: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    """``(path, block, chained)`` for every block with quantization sites, in model order."""
    found = []
    for path, container in model.named_modules():
        if path.rpartition(".")[2] != "blocks" or not isinstance(container, (nn.Sequential, nn.ModuleList)):
            continue
        previous = False  # the previous child is a block we return: its output is this one's input
        for name, blk in container.named_children():
            has_sites = any(isinstance(m, QUANT_MODULES) for m in blk.modules())
            if has_sites:
                found.append((f"{path}.{name}", blk, previous and isinstance(container, nn.Sequential)))
            previous = has_sites
    return found


def reconstruction_units(model: nn.Module, unit: str) -> list[Unit]:
    """The units of ``model``: its blocks (``unit="block"``) or their sub-blocks (``"sublayer"``)."""
    blocks = model_blocks(model)
    if not blocks:
        raise UserError(f"{type(model).__name__} has no transformer blocks to reconstruct (a 'blocks' container "
                        f"whose children hold quantization sites)")
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


__all__ = ["SUBLAYER_SPLITS", "Unit", "model_blocks", "reconstruction_units"]
