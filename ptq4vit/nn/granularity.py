"""Weight-scale granularity options applied to sites after they are inserted."""
from __future__ import annotations

from torch import nn

from ..quant import UniformQuantizer
from .modules import QuantLinear


def use_per_channel_weights(sites: dict[str, nn.Module]) -> None:
    """Give every :class:`QuantLinear` one weight scale per output channel (a refinement of q/k/v blocks)."""
    for site in sites.values():
        if isinstance(site, QuantLinear):
            old = site.w_quant
            site.w_quant = UniformQuantizer(old.bits, site.out_features, axis=0 if site.out_features > 1 else None,
                                            device=old.scale.device)
