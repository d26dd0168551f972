"""fwmodel: the FantasyWorld model (frozen Wan2.1 + trainable geometry branch) and its two-stage trainer."""

from fwdata import __version__

__all__ = ["__version__"]
