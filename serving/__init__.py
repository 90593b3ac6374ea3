"""vae-serve's serving package (no torch): `python -m serving`."""

__version__ = "0.2.0"
