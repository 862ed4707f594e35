"""Caching policies behind one interface: none, fora (reuse), taylorseer, lesa."""

from .base import Policy
from .lesa import LESAPolicy
from .reuse import ReusePolicy
from .taylorseer import TaylorSeerPolicy

__all__ = ["LESAPolicy", "Policy", "ReusePolicy", "TaylorSeerPolicy"]
