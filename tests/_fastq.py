"""A calibration stand-in for the checkpoint/export tests: every scale from absolute maxima.

Checkpoints and the ONNX export must be faithful to whatever scales a model carries, so their
tests do not need the (slow) scale search; this sets each quantizer from one forward pass.
"""
import torch

from ptq4vit.models import insert_quant_sites
from ptq4vit.nn import QuantConv2d, QuantLinear, QuantMatMul
from ptq4vit.presets import get_preset
from ptq4vit.quant import TwinGeluQuantizer, TwinSoftmaxQuantizer, UniformQuantizer, qmax
from ptq4vit.quant.twin import pow2_snap
from ptq4vit.quantized import QuantizedModel, model_name


def _absmax(t, q: UniformQuantizer):
    if q.axis is None:
        return t.abs().amax().reshape(1)
    return t.transpose(0, q.axis).reshape(q.groups, -1).abs().amax(1)


def _set_uniform(q: UniformQuantizer, t, shrink=0.8):
    q.set_scale((_absmax(t, q) / (qmax(q.bits) - 0.5) * shrink).clamp_min(1e-8))


def fast_quantize(model, images, preset="ptq4vit", w_bits=8, a_bits=8, split_exp=3) -> QuantizedModel:
    """Quantization sites of ``preset`` with scales set from absolute maxima (weights: 0.8 max, so that
    codes clip at both ends; activations: the max over ``images``; softmax split ``2^-split_exp``)."""
    import copy
    preset = get_preset(preset)
    name = model_name(model)
    model = copy.deepcopy(model).eval()
    sites = insert_quant_sites(model, preset, w_bits, a_bits)
    qm = QuantizedModel(model, preset, w_bits, a_bits, name)
    seen = {}

    def keep(name):
        def hook(mod, inp, out):
            seen.setdefault(name, [i.detach() for i in inp])
        return hook
    hooks = [m.register_forward_hook(keep(n)) for n, m in sites.items()]
    with torch.no_grad(), qm.quantization_disabled():
        model(images)
    for h in hooks:
        h.remove()
    for n, site in sites.items():
        inputs = seen[n]
        if isinstance(site, (QuantLinear, QuantConv2d)):
            w = site.weight.detach()
            _set_uniform(site.w_quant, w.reshape(site.w_quant.groups, -1) if site.w_quant.axis == 0 else w)
        if isinstance(site, QuantLinear):
            aq = site.a_quant
            if isinstance(aq, TwinGeluQuantizer):
                s = inputs[0].max().reshape(1) / (qmax(aq.bits) - 0.5)
                aq.set_scale(pow2_snap(s, float(aq.neg_scale)) if aq.pow2 else s * 0.9)
            else:
                _set_uniform(aq, inputs[0], 1.0)
        elif isinstance(site, QuantMatMul):
            a, b = inputs
            if isinstance(site.a_quant, TwinSoftmaxQuantizer):
                site.a_quant.set_split(torch.tensor(2.0 ** -split_exp))
            else:
                _set_uniform(site.a_quant, a, 1.0)
            _set_uniform(site.b_quant, b, 1.0)
    return qm
