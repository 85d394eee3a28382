"""Quantizer math (pure tensor functions) and the quantizer modules that hold calibrated scales."""
from .asymmetric import asymmetric_codes, asymmetric_dequantize, asymmetric_fake_quant, range_to_step
from .quantizers import (AsymmetricQuantizer, PostGeluQuantizer, Quantizer, TwinGeluQuantizer, TwinSoftmaxQuantizer,
                         UniformQuantizer, floats, group_view, scale_view)
from .registry import KindRegistry
from .search_space import ScaleSearch
from .twin import (GELU_NEG_RANGE, gelu_twin_codes, gelu_twin_fake_quant, gelu_twin_neg_step, pow2_candidates, softmax_split_candidates,
                   softmax_twin_codes, softmax_twin_fake_quant, softmax_twin_steps)
from .renorm import renormalize_rows
from .log import LOG_BASES, LogQuantizer, log_codes, log_fake_quant, scaled_log_fake_quant
from .gelu_log import GeluLogQuantizer, gelu_log_codes, gelu_log_dequantize, gelu_log_fake_quant
from .uniform import (MIN_SCALE, candidate_factors, check_bits, compute_dtype, initial_scale, qmax, uniform_codes,
                      uniform_dequantize, uniform_fake_quant)
