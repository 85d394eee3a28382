"""Function-preserving transforms of a float model applied before quantization (rotations)."""
from .online import OnlineRotation
from .orthogonal import KroneckerRotation, hadamard, make_rotation, random_orthogonal
from .rotation import RotationOptions, apply_rotation
