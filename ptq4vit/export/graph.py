"""Graph rewrites after tracing: fold scale multiplies, quantize before transposes, drop leftovers, write metadata."""
from __future__ import annotations

import numpy as np

__all__ = ["postprocess"]


def postprocess(path: str, meta: dict, quantize_before_layout: bool = False) -> None:
    """Apply the rewrites to the ONNX file at ``path`` and write ``meta`` as its metadata.

    ``quantize_before_layout`` (QDQ graphs): repeat a per-tensor ``QuantizeLinear`` above the
    ``Transpose``/``Reshape`` chain that feeds it (see :func:`_quantize_before_layout`).
    """
    import onnx

    model = onnx.load(path)
    _fold_constant_muls(model.graph)
    _quantize_before_transpose(model.graph)
    if quantize_before_layout:
        _quantize_before_layout(model.graph)
    _drop_unused(model.graph)
    del model.metadata_props[:]
    for k, v in meta.items():
        p = model.metadata_props.add()
        p.key, p.value = k, str(v)
    onnx.checker.check_model(model)
    onnx.save(model, path)


def _quantize_before_transpose(graph) -> None:
    """``QuantizeLinear(Transpose(x))`` -> ``Transpose(QuantizeLinear(x))`` where the quantization
    axis is not moved (kᵀ of q@kᵀ): the transpose then moves bytes instead of floats, and ORT's
    QDQ propagation no longer wraps it in an extra DequantizeLinear/QuantizeLinear pair."""
    from onnx import helper

    consumers: dict = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    producer = {o: n for n in graph.node for o in n.output}
    for q in [n for n in graph.node if n.op_type == "QuantizeLinear"]:
        t = producer.get(q.input[0])
        if t is None or t.op_type != "Transpose" or len(consumers.get(t.output[0], [])) != 1:
            continue
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None)
        axis = next((a.i for a in q.attribute if a.name == "axis"), 1)
        if perm is None or perm[axis] != axis:
            continue
        mid = q.output[0] + "_before_transpose"
        new_q = helper.make_node("QuantizeLinear", [t.input[0], *q.input[1:]], [mid], name=q.name,
                                 **({"axis": axis} if any(a.name == "axis" for a in q.attribute) else {}))
        new_t = helper.make_node("Transpose", [mid], [q.output[0]], name=t.name, perm=perm)
        idx = list(graph.node).index(q)
        graph.node.remove(t)
        graph.node.remove(q)
        idx = min(idx, len(graph.node))
        graph.node.insert(idx - 1 if idx else 0, new_q)
        graph.node.insert(idx if idx else 1, new_t)


_LAYOUT_OPS = ("Transpose", "Reshape")


def _is_per_tensor(graph, q) -> bool:
    """A QuantizeLinear with one scale (no quantization axis to follow through a reshape)."""
    from onnx import numpy_helper

    if any(a.name == "axis" for a in q.attribute):
        return False
    for n in graph.node:
        if n.op_type == "Constant" and n.output[0] == q.input[1]:
            return numpy_helper.to_array(n.attribute[0].t).size == 1
    for init in graph.initializer:
        if init.name == q.input[1]:
            return numpy_helper.to_array(init).size == 1
    return False


def _quantize_before_layout(graph) -> None:
    """``Q(Reshape(Transpose(x)))`` -> ``Q(Reshape(Transpose(DQ(Q(x)))))`` for a per-tensor Q whose
    layout ops feed nothing else: the same quantizer once more right after the op that computes
    ``x``. Exact (``DQ(Q(x))`` is on the grid, so the second Q gives the same codes). The new Q
    directly follows that op, where a runtime fuses it: OpenVINO runs proj's input quantizer
    as a post-op of its fused attention kernel (the one after the layout ops then only moves
    codes) instead of as a stand-alone FakeQuantize (docs/deployment.md); ONNX Runtime sees the
    usual ``DQ → Transpose/Reshape → Q`` of a QDQ graph and keeps its integer GEMM. (Moving the
    Q instead leaves ONNX Runtime a ``Reshape → DQ → MatMul`` it runs in float.)"""
    from onnx import helper

    consumers: dict = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    added = False
    for q in [n for n in graph.node if n.op_type == "QuantizeLinear"]:
        first, t = None, producer.get(q.input[0])
        while (t is not None and t.op_type in _LAYOUT_OPS and len(consumers.get(t.output[0], [])) == 1
               and t.output[0] not in outputs):
            first, t = t, producer.get(t.input[0])
        if first is None or t is None or t.op_type == "DequantizeLinear" or not _is_per_tensor(graph, q):
            continue
        codes, grid = first.input[0] + "_codes", first.input[0] + "_on_grid"
        graph.node.append(helper.make_node("QuantizeLinear", [first.input[0], *q.input[1:]], [codes],
                                           name=q.name + "_before_layout"))
        graph.node.append(helper.make_node("DequantizeLinear", [codes, *q.input[1:]], [grid],
                                           name=q.name + "_before_layout_dq"))
        first.input[0] = grid
        added = True
    if added:
        _topological_sort(graph)


def _topological_sort(graph) -> None:
    """Reorder the nodes so that each comes after the producers of its inputs (stable otherwise)."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                ordered.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise RuntimeError("graph has a cycle or an undefined input")
        pending = rest
    nodes = [type(n)() for n in ordered]
    for new, old in zip(nodes, ordered):
        new.CopyFrom(old)
    del graph.node[:]
    graph.node.extend(nodes)


def _drop_unused(graph) -> None:
    """Remove Constant nodes and initializers nothing reads (left behind by the rewrites)."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for n in [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]:
        graph.node.remove(n)
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def _fold_constant_muls(graph) -> None:
    """``Mul(Mul(x, c1), c2) -> Mul(x, c1·c2)`` for scalar/broadcast constants (q@kᵀ's per-head
    scale times the attention ``* scale``): one elementwise pass less per attention block."""
    from onnx import numpy_helper

    consts = {}
    for n in graph.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            consts[n.output[0]] = n
    for init in graph.initializer:
        consts.setdefault(init.name, init)

    def value(name):
        c = consts.get(name)
        if c is None:
            return None
        return numpy_helper.to_array(c.attribute[0].t if hasattr(c, "attribute") and c.attribute else c)

    consumers: dict = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    producer = {o: n for n in graph.node for o in n.output}
    graph_outputs = {o.name for o in graph.output}
    removed = []
    for n in list(graph.node):
        if n.op_type != "Mul":
            continue
        c2 = value(n.input[1])
        first = producer.get(n.input[0])
        if c2 is None or first is None or first.op_type != "Mul" or n.input[0] in graph_outputs:
            continue
        if len(consumers.get(first.output[0], [])) != 1:
            continue
        c1 = value(first.input[1])
        if c1 is None or c1.dtype != np.float32 or c2.dtype != np.float32 or c2.size != 1:
            continue
        folded = (c1 * c2.reshape(())).astype(np.float32)
        name = first.output[0] + "_folded_scale"
        graph.initializer.append(numpy_helper.from_array(folded, name))
        n.input[0] = first.input[0]
        n.input[1] = name
        removed.append(first)
    for r in removed:
        graph.node.remove(r)


