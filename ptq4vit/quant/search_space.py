"""The space a quantizer's parameter is searched in: what a grid search asks of a quantizer kind.

The search (:mod:`ptq4vit.calib.calibrate`) is the same for every kind: candidates around a
starting point (or a fixed list), each scored by fake-quantizing the operand at it, the best one
stored. Where the search starts, how a candidate quantizes and what storing means differ per
kind, so each quantizer describes them with a :class:`ScaleSearch` (``Quantizer.scale_search``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class ScaleSearch:
    """One quantizer's searched parameter.

    * ``start``: the starting point (one value per group); the candidates are the search grid's
      multiples of it. None when ``fixed`` gives the candidates.
    * ``fake_quant(x, p)``: ``x`` quantized with parameter ``p``, which broadcasts against ``x``
      (a stack of candidates with a leading dim gives every candidate's result at once).
    * ``store(p)``: write the chosen parameter into the quantizer (marks it calibrated).
    * ``restrict(candidates)``: the candidates the quantizer can take among the grid's (the
      search then starts from the one nearest ``start``); None: all of them.
    * ``fixed``: candidates that do not depend on the data, shaped ``(n, 1)``.
    """

    fake_quant: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    store: Callable[[torch.Tensor], None]
    start: Optional[torch.Tensor] = None
    restrict: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    fixed: Optional[torch.Tensor] = None
