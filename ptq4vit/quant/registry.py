"""Handlers keyed by quantizer kind, for what other layers know about each kind.

A quantizer answers for itself what belongs to quantization (its codes, its spec, the memory its
fake quantization takes, the space its parameter is searched in: :class:`~.quantizers.Quantizer`).
What belongs to another layer (the ONNX nodes a kind lowers to, a calibration method's
initialisation) lives in that layer, in a :class:`KindRegistry` it fills for the kinds it knows,
so that adding a kind means registering it, not extending a chain of ``isinstance`` checks.
"""
from __future__ import annotations

from typing import Callable, Generic, Optional, TypeVar

from torch import nn

H = TypeVar("H")


class KindRegistry(Generic[H]):
    """One handler per class (a quantizer kind, or a site class); a subclass without its own handler
    takes its nearest base's.

    ``what`` names the role in messages: ``KindRegistry("input quantizer").get(q)`` raises
    ``NotImplementedError("input quantizer GeluLogQuantizer")`` for a kind with no handler.
    """

    def __init__(self, what: str):
        self.what = what
        self._handlers: dict[type, H] = {}

    def register(self, kind: type, handler: H) -> H:
        """Make ``handler`` the one for quantizers of class ``kind`` (and its subclasses); returns it."""
        if kind in self._handlers:
            raise ValueError(f"{kind.__name__} already has a handler here ({self.what})")
        self._handlers[kind] = handler
        return handler

    def registering(self, kind: type) -> Callable[[H], H]:
        """Decorator form of :meth:`register`."""
        return lambda handler: self.register(kind, handler)

    def find(self, q: nn.Module) -> Optional[H]:
        """The handler for ``q``'s class, or None."""
        for cls in type(q).__mro__:
            if cls in self._handlers:
                return self._handlers[cls]
        return None

    def get(self, q: nn.Module) -> H:
        """The handler for ``q``'s class; NotImplementedError naming the role and class when none is registered."""
        handler = self.find(q)
        if handler is None:
            raise NotImplementedError(f"{self.what} {type(q).__name__}")
        return handler

    def kinds(self) -> tuple[type, ...]:
        """The registered classes, in registration order."""
        return tuple(self._handlers)
