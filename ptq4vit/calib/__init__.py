"""Calibration: capture in one pass, batched scale search, metrics, and the memory plan."""
from .budget import Plan, default_memory_budget, measure_costs, plan
from .calibrate import calibrate_site
from .capture import SiteData, capture
from .metrics import cosine_, neg_mean_square_
from .run import calibrate_model, default_workers, intra_op_threads
from .search import SEARCH_CHUNK_BYTES, Product, best_index, best_pruned, score
