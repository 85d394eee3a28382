"""Plots: accuracy drop per bit setting, and one block's post-softmax / post-GELU activations
drawn with the quantization grid a run chose."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from ..errors import UserError
from .labels import bits_label, bits_order, method_label, model_order
from .store import latest_by_key


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plots need matplotlib: pip install 'ptq4vit[report]'") from None
    return plt


def _series_label(r: dict) -> str:
    if r.get("ablation_row") is not None:
        return f"{r['preset']} ablation row {r['ablation_row']}"
    return method_label(r)


def plot_accuracy_drop(rows: list[dict], path) -> Path:
    """Grouped bars: float minus quantized top-1 per model, one bar per method and bit setting."""
    plt = _pyplot()
    rows = [r for r in latest_by_key(rows) if r.get("drop") is not None]
    models = model_order(r["model"] for r in rows)
    series = sorted({(_series_label(r), bits_label(r)) for r in rows}, key=lambda s: (bits_order(s[1]), s[0]))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(models) * max(1, len(series)) ** 0.5 + 2), 4.5))
    width = 0.8 / max(1, len(series))
    for j, (m, b) in enumerate(series):
        xs, ys = [], []
        for i, model in enumerate(models):
            cell = [r for r in rows if r["model"] == model and bits_label(r) == b and _series_label(r) == m]
            if cell:
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(cell[-1]["drop"])
        ax.bar(xs, ys, width=width, label=f"{m} {b}")
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels(models, rotation=30, ha="right")
    ax.set_ylabel("top-1 drop vs float (points)")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_title("Accuracy drop from quantization")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def softmax_grid(entry: dict, bits: int, head: int = 0) -> tuple[list[float], Optional[float]]:
    """Representable post-softmax values of a matmul2 A operand (twin: both ranges) and the split, if any."""
    qmax = 2 ** (bits - 1)
    if "split" in entry:
        s = float(entry["split"])
        d1, d2 = s / (qmax - 1), 1.0 / (qmax - 1)
        lo = [k * d1 for k in range(qmax) if k * d1 < s]
        hi = [k * d2 for k in range(qmax) if k * d2 >= s]
        return lo + hi, s
    d = float(entry["a_scale"][min(head, len(entry["a_scale"]) - 1)])
    return [k * d for k in range(qmax)], None


def gelu_grid(entry: dict, bits: int) -> list[float]:
    """Representable post-GELU values of fc2's input (twin: negative Δ- range and positive Δ+ range)."""
    qmax = 2 ** (bits - 1)
    pos = float(entry["a_scale"][0])
    if "a_neg_scale" in entry:
        neg = float(entry["a_neg_scale"])
        return [-k * neg for k in range(qmax, 0, -1)] + [k * pos for k in range(qmax)]
    return [k * pos for k in range(-qmax, qmax)]


def activation_entries(qparams: dict, block: str, what: str = "the run") -> tuple[dict, dict]:
    """The ``attn.matmul2`` and ``mlp.fc2`` entries of ``block`` whose grids the activation plot draws:
    a quantized post-softmax operand and a quantized fc2 input. UserError if the run has none."""
    mods = qparams.get("modules", {})
    m2 = mods.get(f"{block}.attn.matmul2")
    f2 = mods.get(f"{block}.mlp.fc2")
    if m2 is None:
        raise UserError(f"{what} has no {block}.attn.matmul2 entry, a quantized post-softmax product, to plot (its preset "
                        f"{qparams.get('preset', '?')!r} keeps attention float); --activations needs a run that "
                        f"quantizes attention")
    if "split" not in m2 and ("a_scale" not in m2 or "a_log" in m2):
        raise UserError(f"{what} quantizes {block}.attn.matmul2's post-softmax input on a grid this plot does not "
                        f"draw (only twin and uniform grids)")
    if f2 is None or "a_scale" not in f2 or "a_log" in f2:
        raise UserError(f"{what} has no uniform or twin fc2 input grid in {block}.mlp.fc2 to plot")
    return m2, f2


def find_block(model, layer) -> str:
    """The module name of a transformer block (one with ``attn`` and ``mlp.fc2``): a name, or an index into
    the model's blocks (negative counts from the end)."""
    blocks = [n for n, m in model.named_modules() if hasattr(m, "attn") and hasattr(getattr(m, "mlp", None), "fc2")]
    if not blocks:
        raise UserError("the model has no transformer blocks with attn and mlp.fc2")
    if layer is None:
        return blocks[len(blocks) // 2]
    if isinstance(layer, int) or (isinstance(layer, str) and layer.lstrip("-").isdigit()):
        i = int(layer)
        if not -len(blocks) <= i < len(blocks):
            raise UserError(f"block index {i} out of range: the model has {len(blocks)} blocks")
        return blocks[i]
    name = str(layer)
    for suffix in (".attn.matmul2", ".mlp.fc2", ".attn", ".mlp"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name not in blocks:
        raise UserError(f"no block {layer!r}; blocks are {', '.join(blocks[:4])}{' ...' if len(blocks) > 4 else ''}")
    return name


def capture_block_activations(model, images, block: str, batch_size: int = 8) -> tuple:
    """Post-softmax attention probabilities ``(B, heads, N, N)`` and the post-GELU fc2 input of ``block``,
    from the float model (its attention is switched to the explicit, non-fused path while capturing)."""
    import torch
    mod = model.get_submodule(block)
    attn, fc2 = mod.attn, mod.mlp.fc2
    probs, gelu = [], []
    saved = getattr(attn, "fused_attn", None)
    if saved is not None:
        attn.fused_attn = False
    drop = getattr(attn, "attn_drop", None)
    if drop is None:
        raise UserError(f"cannot capture the softmax output of {block}.attn (no attn_drop module)")
    h1 = drop.register_forward_pre_hook(lambda m, a: probs.append(a[0].detach().cpu()))
    h2 = fc2.register_forward_pre_hook(lambda m, a: gelu.append(a[0].detach().cpu()))
    try:
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                model(images[i:i + batch_size])
    finally:
        h1.remove()
        h2.remove()
        if saved is not None:
            attn.fused_attn = saved
    return torch.cat([p.reshape(-1, *p.shape[-3:]) for p in probs]), torch.cat([g.reshape(-1) for g in gelu])


def plot_activations(model, images, qparams: dict, path, layer=None, *, title: str = "") -> Path:
    """Histograms of the post-softmax and post-GELU activations of one block with the quantization grid
    chosen in ``qparams`` (docs/method.md §8) drawn over them."""
    import numpy as np
    plt = _pyplot()
    block = find_block(model, layer)
    probs, gelu = capture_block_activations(model, images, block)
    a_bits = int(qparams["a_bits"])
    m2, f2 = activation_entries(qparams, block)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))

    # post-softmax, log-x
    grid, split = softmax_grid(m2, a_bits)
    vals = (probs if split is not None else probs[:, 0]).reshape(-1).numpy()
    floor = 1e-7
    bins = np.logspace(np.log10(floor), 0, 120)
    ax1.hist(np.clip(vals, floor, 1.0), bins=bins, color="tab:blue", alpha=0.7, log=True)
    ax1.set_xscale("log")
    pos_grid = [g for g in grid if g > 0]
    ax1.vlines(pos_grid, 0, 0.08, transform=ax1.get_xaxis_transform(), color="tab:red", linewidth=0.8,
               label=f"grid ({len(grid)} levels incl. 0)")
    if split is not None:
        ax1.axvline(split, color="tab:red", linestyle="--", linewidth=1.2, label=f"twin split s = 2^{round(math.log2(split))}")
    ax1.set_xlabel("post-softmax value (log scale; values below 1e-7 piled at the left)")
    ax1.set_ylabel("count")
    ax1.set_title(f"{block}.attn.matmul2 A ({'twin' if split is not None else 'uniform, head 0'}, {a_bits} bits)")
    ax1.legend(fontsize="small")

    # post-GELU, linear-x
    ggrid = gelu_grid(f2, a_bits)
    g = gelu.numpy()
    ax2.hist(g, bins=200, color="tab:green", alpha=0.7, log=True)
    ax2.vlines(ggrid, 0, 0.08, transform=ax2.get_xaxis_transform(), color="tab:red", linewidth=0.6,
               label=f"grid ({len(ggrid)} levels)")
    ax2.axvline(ggrid[0], color="tab:red", linestyle=":", linewidth=1)
    ax2.axvline(ggrid[-1], color="tab:red", linestyle=":", linewidth=1, label="clipping range")
    ax2.set_xlabel("post-GELU value (fc2 input)")
    ax2.set_title(f"{block}.mlp.fc2 input ({'twin' if 'a_neg_scale' in f2 else 'uniform'}, {a_bits} bits)")
    ax2.legend(fontsize="small")
    fig.suptitle(title or f"{qparams.get('model', '')} {qparams.get('preset', '')} W{qparams.get('w_bits')}A{a_bits}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
