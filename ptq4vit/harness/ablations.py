"""The ablation tables the harness runs: named overrides of a recipe, one component changed per row.

Rows are written with the flat field names (``ptq4vit.recipes.FLAT_PATHS`` says where each lives
in a recipe), or dotted recipe paths where no flat name exists (reconstruction);
:func:`ptq4vit.get_recipe` applies them.
"""
from __future__ import annotations

#: The six ablation rows of the paper's README: (label, overrides).
ABLATION_ROWS: dict[int, tuple[str, dict]] = {
    1: ("cosine, no twin", dict(metric="cosine", softmax_twin=False, gelu_twin=False)),
    2: ("hessian, no twin", dict(metric="hessian", softmax_twin=False, gelu_twin=False)),
    3: ("hessian, softmax twin", dict(metric="hessian", softmax_twin=True, gelu_twin=False)),
    4: ("hessian, GELU twin", dict(metric="hessian", softmax_twin=False, gelu_twin=True)),
    5: ("cosine, both twins", dict(metric="cosine", softmax_twin=True, gelu_twin=True)),
    6: ("hessian, both twins", dict(metric="hessian", softmax_twin=True, gelu_twin=True)),
}


#: One component of ``rotq`` switched off per row (docs/lowbit.md): (label, overrides of ``rotq``).
ROTQ_ABLATION_ROWS: dict[str, dict] = {
    "no rotation": dict(rotate_residual=False, rotate_heads=False, rotate_fc2=False),
    "no residual rotation": dict(rotate_residual=False),
    "no head rotation": dict(rotate_heads=False),
    "no fc2 rotation (GELU twin)": dict(rotate_fc2=False, gelu_twin=True),
    "round to nearest": dict(weight_rounding="nearest"),
    "per-block weight scales": dict(w_granularity="block"),
    "log-sqrt2 softmax": dict(softmax_log="log_sqrt2"),
    "head at the run's bits": dict(head_bits=0),
    "no softmax renormalization": dict(softmax_renorm=False),
    "symmetric inputs": dict(asymmetric_inputs=False),
    "no bias correction": dict(bias_correction=False),
}


#: One component of ``deploy8`` switched off per row (docs/deployment.md): (label, overrides of ``deploy8``).
DEPLOY_ABLATION_ROWS: dict[str, dict] = {
    "symmetric inputs": dict(asymmetric_inputs=False),
    "no bias correction": dict(bias_correction=False),
    "smoothing alpha 0.5": dict(smooth_alpha=0.5),
    "no smoothing": dict(smooth_alpha=0.0),
}


#: fc2's post-GELU input quantizer, one kind per row (docs/lowbit.md §8): (label, overrides of ``ptq4vit``).
#: The GELU twin has no row: it is ``ptq4vit`` as it is, the "(as is)" line of the report's Variants table.
POST_GELU_ROWS: dict[str, dict] = {
    "uniform": dict(gelu_twin=False),
    "log2": dict(gelu_twin=False, gelu_log="log2"),
    "log-sqrt2": dict(gelu_twin=False, gelu_log="log_sqrt2"),
}


#: One component of ``repq-vit`` switched off per row (docs/lowbit.md §6): (label, overrides of ``repq-vit``).
REPQ_ABLATION_ROWS: dict[str, dict] = {
    "no reparameterization": dict(reparam_ln=False),
    "uniform softmax": dict(softmax_log="none"),  # (the log scale goes with the log quantizer)
    "float image": dict(patch_input_bits=0),
    "rounded zero point": dict(reparam_round_zero_point=True),
}

#: ``rotq`` followed by reconstruction (docs/lowbit.md §11): the overrides that turn it on.
RECONSTRUCTION: dict = {"reconstruction": "learned"}

#: One switch of the reconstruction changed per row: (label, overrides of ``rotq`` with ``RECONSTRUCTION``).
RECONSTRUCTION_ABLATION_ROWS: dict[str, dict] = {
    "no learned rounding": {"reconstruction.learn_rounding": False},
    "AdaRound rounding": {"reconstruction.rounding": "adaround"},
    "no step learning": {"reconstruction.learn_steps": False},
    "QDrop 0.5": {"reconstruction.qdrop": 0.5},
    "Fisher-weighted error": {"reconstruction.fisher": True},
    "float block inputs": {"reconstruction.inputs": "float"},
    "sub-block units": {"reconstruction.unit": "sublayer"},
    "pool of 256 images": {"reconstruction.images": 256},
    "learned weight steps": {"reconstruction.learn_weight_steps": True},
    "network stage": {"reconstruction.network_iterations": 20},
    "last block on its whole output": {"reconstruction.last_unit": "output"},
}

#: Each preset's named variants (one component switched off or swapped): the rows of its ablation.
VARIANT_ROWS: dict[str, dict[str, dict]] = {
    "rotq": {**ROTQ_ABLATION_ROWS, "reconstruction": RECONSTRUCTION,
             **{f"reconstruction, {k}": {**RECONSTRUCTION, **v} for k, v in RECONSTRUCTION_ABLATION_ROWS.items()}}, "repq-vit": REPQ_ABLATION_ROWS, "ptq4vit": POST_GELU_ROWS,
    "deploy8": DEPLOY_ABLATION_ROWS,
}
