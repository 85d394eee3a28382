"""Function-preserving transforms of a float model applied before quantization (rotations)."""
from .modules import OnlineRotation, RMSNorm, RotatedLayerNorm
from .orthogonal import KroneckerRotation, hadamard, make_rotation, random_orthogonal
from .rotation import RotationOptions, apply_rotation
