"""Caching policies behind one interface: none, fora (reuse), taylorseer, linear, teacache, lesa."""

from .base import Policy
from .lesa import LESAPolicy, ScheduleFreePolicy
from .linear import LinearForecastPolicy
from .reuse import ReusePolicy
from .taylorseer import TaylorSeerPolicy
from .teacache import TeaCachePolicy

__all__ = [
    "LESAPolicy",
    "LinearForecastPolicy",
    "Policy",
    "ReusePolicy",
    "ScheduleFreePolicy",
    "TaylorSeerPolicy",
    "TeaCachePolicy",
]
