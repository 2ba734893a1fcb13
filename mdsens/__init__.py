"""mdsens."""
