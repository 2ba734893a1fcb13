"""System recipes shipped with mdsens (TOML files, read with importlib.resources)."""
