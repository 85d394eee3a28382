"""Integer GEMM operand types chosen for the CPU that loads a graph, not the one that exported it.

ONNX Runtime's x86 u8×s8 kernel is exact only with VNNI: without it (AVX2) ``vpmaddubsw``
saturates pair sums at int16, so a full-range uint8 activation (zero point 128) times int8
weights can be wrong, while u8×u8 (16-bit path) is exact everywhere (docs/deployment.md). The
twins' codes (at most 128) and activations below 8 bits are exact with u8×s8 on every CPU.

:func:`adapt_for_cpu` rewrites the products whose left operand is full range, in place:

* ``vnni=False``: int8 right operands become uint8 with zero point 128 (``code + 128``, the same
  integers), in contrib graphs (``MatMulIntegerToFloat``) and in QDQ graphs (the
  ``DequantizeLinear`` of a weight, or the ``QuantizeLinear → DequantizeLinear`` of k/v);
* ``vnni=True``: contrib u8×u8 products (a ``gemm="portable"`` file) become u8×s8, the fast
  VNNI kernel.

The integers of every product are unchanged, so outputs are too, on any CPU.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

__all__ = ["adapt_for_cpu"]


def _graph_maps(graph):
    inits = {i.name: i for i in graph.initializer}
    consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    producer = {o: n for n in graph.node for o in n.output}
    return inits, consts, producer


def _get(name, inits, consts):
    from onnx import numpy_helper
    if name in inits:
        return numpy_helper.to_array(inits[name])
    if name in consts:
        return numpy_helper.to_array(consts[name].attribute[0].t)
    return None


def _fresh(graph, base: str, value, inits) -> str:
    from onnx import numpy_helper
    name, i = f"{base}_cpu", 0
    while name in inits:
        i += 1
        name = f"{base}_cpu{i}"
    t = numpy_helper.from_array(np.ascontiguousarray(value), name)
    graph.initializer.append(t)
    inits[name] = graph.initializer[-1]
    return name


def _to_u8(graph, node, value_idx: int, zp_idx: int, inits, consts) -> bool:
    """Inputs ``value_idx``/``zp_idx`` of ``node``: int8 codes with zero point 0 -> uint8 + 128."""
    w, zp = _get(node.input[value_idx], inits, consts), _get(node.input[zp_idx], inits, consts)
    if w is None or zp is None or w.dtype != np.int8 or zp.dtype != np.int8 or np.any(zp != 0):
        return False
    node.input[value_idx] = _fresh(graph, node.input[value_idx], (w.astype(np.int16) + 128).astype(np.uint8), inits)
    node.input[zp_idx] = _fresh(graph, node.input[zp_idx], np.full(zp.shape, 128, np.uint8), inits)
    return True


def _to_s8(graph, node, value_idx: int, zp_idx: int, inits, consts) -> bool:
    """uint8 codes with zero point 128 -> int8 with zero point 0."""
    w, zp = _get(node.input[value_idx], inits, consts), _get(node.input[zp_idx], inits, consts)
    if w is None or zp is None or w.dtype != np.uint8 or zp.dtype != np.uint8 or np.any(zp != 128):
        return False
    node.input[value_idx] = _fresh(graph, node.input[value_idx], (w.astype(np.int16) - 128).astype(np.int8), inits)
    node.input[zp_idx] = _fresh(graph, node.input[zp_idx], np.zeros(zp.shape, np.int8), inits)
    return True


def _codes_source(node_input: str, producer):
    """The QuantizeLinear that computes an operand, through one Transpose (kᵀ), or None."""
    n = producer.get(node_input)
    if n is not None and n.op_type == "Transpose":
        n = producer.get(n.input[0])
    return n if n is not None and n.op_type == "QuantizeLinear" else None


def _computed_to_u8(graph, q, consumer, zp_idx: int, inits, consts) -> bool:
    """A computed int8 operand (``q``'s output, zero point 0) read by ``consumer`` as uint8 + 128:
    both zero points change, the saturating range [-128, 127] maps onto [0, 255]."""
    zq = _get(q.input[2], inits, consts) if len(q.input) > 2 else None
    zc = _get(consumer.input[zp_idx], inits, consts) if len(consumer.input) > zp_idx else None
    if zq is None or zc is None or zq.dtype != np.int8 or zc.dtype != np.int8 or np.any(zq != 0) or np.any(zc != 0):
        return False
    q.input[2] = _fresh(graph, q.input[2], np.full(zq.shape, 128, np.uint8), inits)
    consumer.input[zp_idx] = _fresh(graph, consumer.input[zp_idx], np.full(zc.shape, 128, np.uint8), inits)
    return True


def _full_range_left(graph_maps, node, inits, consts, readers: Counter) -> bool:
    """Whether the left operand of a product spans all 256 codes (8 bits, not a twin, not clipped)."""
    _, _, producer = graph_maps
    if node.op_type == "MatMulIntegerToFloat":
        # uint8 codes straight from a QuantizeLinear span all 256 values, with zero point 128 (symmetric)
        # or any other (an asymmetric input); narrower codes pass through a Clip first, except the
        # post-GELU twin's negative part (zero point 0, at most 128 by GELU's minimum), which shares
        # its weight codes with the positive part
        zp = _get(node.input[4], inits, consts) if len(node.input) > 4 and node.input[4] else None
        if zp is None or zp.dtype != np.uint8:
            return False
        q = producer.get(node.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            return False
        return bool(np.all(zp == 128)) or readers[node.input[1]] == 1
    dq = producer.get(node.input[0])
    if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3:
        return False
    zp = _get(dq.input[2], inits, consts)
    q = producer.get(dq.input[0])
    if zp is None or zp.dtype != np.int8 or q is None or q.op_type != "QuantizeLinear":
        return False
    before = producer.get(q.input[0])
    return before is None or before.op_type != "Clip"  # a clip bounds the codes (twins, fewer bits)


def adapt_for_cpu(model, vnni: bool) -> int:
    """Rewrite ``model`` (an ``onnx.ModelProto``) for a CPU with or without VNNI; return how many
    products changed operand types."""
    graph = model.graph
    inits, consts, producer = maps = _graph_maps(graph)
    changed = 0
    readers = Counter(n.input[1] for n in graph.node if n.op_type == "MatMulIntegerToFloat")  # right operands
    for node in list(graph.node):
        if node.op_type == "MatMulIntegerToFloat":
            if not _full_range_left(maps, node, inits, consts, readers):
                continue
            if vnni:
                changed += _to_s8(graph, node, 1, 5, inits, consts)
            elif _get(node.input[1], inits, consts) is not None:   # a weight
                changed += _to_u8(graph, node, 1, 5, inits, consts)
            else:                                                   # kᵀ of q @ kᵀ
                q = _codes_source(node.input[1], producer)
                changed += q is not None and _computed_to_u8(graph, q, node, 5, inits, consts)
        elif node.op_type == "MatMul" and not vnni and _full_range_left(maps, node, inits, consts, readers):
            dq = producer.get(node.input[1])
            if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3:
                continue
            if _get(dq.input[0], inits, consts) is not None:   # a weight: int8 codes
                changed += _to_u8(graph, dq, 0, 2, inits, consts)
                continue
            q = _codes_source(dq.input[0], producer)          # k or v: computed codes
            changed += q is not None and _computed_to_u8(graph, q, dq, 2, inits, consts)
    return changed
