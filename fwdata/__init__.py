"""fwdata: raw videos -> geometry-labelled training data (depth, point maps, cameras), validated."""

__version__ = "0.1.0"
