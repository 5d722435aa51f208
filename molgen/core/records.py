"""Helpers for records read back from TFDS ArrayRecord data sources."""


def as_str(x) -> str:
    """TFDS Text features come back as bytes from an ArrayRecord data source."""
    return x.decode() if isinstance(x, bytes) else str(x)
