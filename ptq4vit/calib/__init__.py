"""Calibration: capture in one pass, batched scale search, metrics."""
from .calibrate import calibrate_site
from .capture import capture, default_memory_budget, estimate_site_bytes, plan_groups
from .metrics import cosine_, neg_mean_square_
from .search import SEARCH_CHUNK_BYTES, Product, best_index, best_pruned, score
