"""Second-order weight quantization of linear layers: scales from ``H = XᵀX``, GPTQ rounding (docs/lowbit.md §3).

A linear layer's output error for a weight error ``D`` (rows = output channels) over the
calibration inputs ``X`` is ``Σ_rows D_r H D_rᵀ`` with ``H = XᵀX``, which the capture pass
already gives (the layer's inputs). Two uses:

* :func:`search_group_scales`: for each weight group (a block of output rows: the layer, a
  q/k/v block, or one channel) pick the grid scale whose round-to-nearest error weighted by
  ``diag(H)`` (``Σ_k H_kk D_rk²``, the input channels' energies) is smallest. The full
  ``D H Dᵀ`` would cost ``K`` times more per candidate (about 3 TFLOP for a ViT-S); GPTQ's
  rounding then accounts for the off-diagonal part.
* :func:`compensated_target`: with ``gptq_quantized_inputs``, the float weight ``W*`` that maps the
  layer's *quantized* inputs ``X̃`` closest to its float outputs (a damped least-squares fit,
  docs/lowbit.md §10), and ``H̃ = X̃ᵀX̃``; GPTQ then rounds ``W*`` under ``H̃``, so the weights also
  compensate the input quantizer's error.
* :func:`gptq_quantize`: with those scales fixed, quantize the columns one by one and spread
  each column's rounding error over the columns not yet quantized (GPTQ/OPTQ, Frantar et al.
  2023), in blocks of columns with a lazy update of the rest, optionally in decreasing
  ``diag(H)`` order ("act-order"), with ``damp · mean(diag H)`` added to the diagonal.

Linear-layer calibration with this path (``calibrate.calibrate_linear_second_order``) then searches
the input quantizer with the preset's metric against the quantized weight, as the PTQ4ViT
path does, and with GPTQ writes the quantized weight into the layer (so that fake quantization, the
checkpoint codes and the ONNX export all reproduce exactly the GPTQ-rounded values; rounded to
nearest, the weight is left float: the quantizer rounds it to the same values).
"""
from __future__ import annotations

import torch

from ..quant import initial_scale, uniform_fake_quant


def input_hessian(x: torch.Tensor) -> torch.Tensor:
    """``XᵀX`` in float64 over every row of ``x`` (``(..., K)``)."""
    x2 = x.reshape(-1, x.shape[-1]).to(torch.float64)
    return x2.t() @ x2


def input_energy(x: torch.Tensor) -> torch.Tensor:
    """``diag(XᵀX)`` in float64 (each input channel's energy): all that the scale search reads of
    ``H``, at ``K`` times less work than :func:`input_hessian` when no GPTQ follows."""
    x2 = x.reshape(-1, x.shape[-1]).to(torch.float64)
    return x2.square().sum(0)


def compensated_target(w: torch.Tensor, x: torch.Tensor, quant, damp: float, rows_per_step: int = 4096):
    """``(W*, H̃)`` in float64: the weight fitting the quantized inputs to the float outputs, and ``X̃ᵀX̃``.

    ``W* = argmin ||X Wᵀ - X̃ W*ᵀ||² + λ ||W* - W||²`` with ``X̃ = quant(X)`` and
    ``λ = damp · mean(diag H̃)``: the normal equations ``(H̃ + λI) W*ᵀ = X̃ᵀX Wᵀ + λ Wᵀ``. The
    damping pulls ``W*`` towards ``W`` where ``X̃`` says little (dead or rare input channels). The
    output error of any ``Ŵ`` then splits into the fit's residual plus ``(W* - Ŵ) H̃ (W* - Ŵ)ᵀ``
    (exactly when ``λ = 0``), which is what GPTQ minimises given ``H̃``. ``x`` is ``(..., K)``; rows
    are quantized and accumulated ``rows_per_step`` at a time in float64, so no quantized copy of
    all of ``x`` is made.
    """
    if damp <= 0:
        raise ValueError("compensated_target needs damp > 0 (the fit is singular for dead input channels)")
    x2 = x.reshape(-1, x.shape[-1])
    k = x2.shape[1]
    hq = torch.zeros(k, k, dtype=torch.float64, device=x2.device)
    cross = torch.zeros_like(hq)
    for r0 in range(0, x2.shape[0], rows_per_step):
        xs = x2[r0:r0 + rows_per_step]
        xq = quant(xs).to(torch.float64)
        hq += xq.t() @ xq
        cross += xq.t() @ xs.to(torch.float64)
    w64 = w.to(torch.float64)
    lam = damp * torch.diagonal(hq).mean()
    eye = torch.eye(k, dtype=torch.float64, device=hq.device)
    return torch.linalg.solve(hq + lam * eye, cross @ w64.t() + lam * w64.t()).t(), hq


def row_scales(scales: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-row scales from ``(groups,)`` scales of contiguous row blocks."""
    return scales.repeat_interleave(rows // scales.numel())


def search_group_scales(w: torch.Tensor, h: torch.Tensor, groups: int, bits: int, factors: torch.Tensor,
                        budget_bytes: int = 64 << 20) -> torch.Tensor:
    """``(groups,)`` scales minimising the ``diag(H)``-weighted round-to-nearest error of each block of rows.

    ``h`` is ``H`` ``(K, K)`` or its diagonal ``(K,)`` (:func:`input_energy`). Candidates are ``Δ0 · factors`` with ``Δ0`` from each group's absolute maximum; the first
    minimum wins on ties.
    """
    rows, k = w.shape
    wd = w.to(torch.float64)
    energy = (torch.diagonal(h) if h.dim() == 2 else h).to(torch.float64)              # (K,)
    per_group = rows // groups
    start = initial_scale(wd.reshape(groups, -1).abs().amax(1), bits)                # (groups,)
    cands = factors.to(wd).reshape(-1, 1) * start                                      # (n, groups)
    step = max(1, budget_bytes // (8 * 2 * rows * k))
    errs = []
    for c0 in range(0, cands.shape[0], step):
        s = cands[c0:c0 + step].repeat_interleave(per_group, dim=1).unsqueeze(-1)       # (c, rows, 1)
        d = uniform_fake_quant(wd.unsqueeze(0), s, bits).sub_(wd)                      # (c, rows, K)
        e = d.square_() @ energy                                                       # (c, rows)
        errs.append(e.reshape(e.shape[0], groups, per_group).sum(-1))
    best = torch.cat(errs).argmin(0)                                                   # (groups,)
    return cands[best, torch.arange(groups, device=cands.device)].to(w.dtype)


def _cholesky_inverse_upper(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = UᵀU``): row ``i`` of U holds the OBS updates of column i."""
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def prepare_hessian(w: torch.Tensor, h: torch.Tensor, damp: float, act_order: bool):
    """Float64 copies of W and H with dead inputs zeroed, the column order, and damping applied."""
    w = w.to(torch.float64).clone()
    h = h.to(torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    else:
        perm = torch.arange(h.shape[0], device=h.device)
    w = w[:, perm]
    h = h[perm][:, perm]
    h += damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return w, h, perm


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, bits: int, *, damp: float = 0.01,
                  act_order: bool = True, block: int = 128) -> torch.Tensor:
    """GPTQ-rounded weight (dequantized, on the grid of ``scale``), same shape and dtype as ``w``.

    Args:
        w: ``(out, in)`` float weight.
        h: ``(in, in)`` ``XᵀX`` of the layer's inputs.
        scale: ``(out,)`` per-row quantization steps (expand block scales with :func:`row_scales`).
        damp: fraction of ``mean(diag H)`` added to the diagonal.
        act_order: quantize columns in decreasing ``diag(H)`` order.
        block: columns per lazily updated block.
    """
    return gptq_round(w, h, scale, bits, damp=damp, act_order=act_order, block=block)[0]


def gptq_round(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, bits: int, *, damp: float = 0.01,
               act_order: bool = True, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rounded, unrounded)``: :func:`gptq_quantize`'s weight, and each column as GPTQ found it just
    before rounding it (the float weight plus the updates of the columns rounded before it), whose
    round to nearest *is* the rounded weight. Learned rounding starts from the unrounded one
    (docs/lowbit.md §11): a weight GPTQ left near half a step can still go either way.
    """
    if block < 1:
        raise ValueError("block must be positive")
    wp, hp, perm = prepare_hessian(w, h, damp, act_order)
    u = _cholesky_inverse_upper(hp)
    s = scale.to(torch.float64).reshape(-1, 1)
    n = wp.shape[1]
    q = torch.empty_like(wp)
    before = torch.empty_like(wp)
    for b0 in range(0, n, block):
        b1 = min(n, b0 + block)
        wb = wp[:, b0:b1].clone()
        errs = torch.empty_like(wb)
        ub = u[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = wb[:, i:i + 1]
            before[:, b0 + i:b0 + i + 1] = col
            qc = uniform_fake_quant(col, s, bits)
            q[:, b0 + i:b0 + i + 1] = qc
            err = (col - qc) / ub[i, i]
            wb[:, i:] -= err * ub[i:i + 1, i:]
            errs[:, i:i + 1] = err
        wp[:, b1:] -= errs @ u[b0:b1, b1:]
    rounded, unrounded = torch.empty_like(q), torch.empty_like(before)
    rounded[:, perm] = q
    unrounded[:, perm] = before
    return rounded.to(w.dtype), unrounded.to(w.dtype)
