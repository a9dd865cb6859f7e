"""Exporters that run without JAX. ``slice_hf``: cut one budget out of an elastic HF export using
only torch + safetensors (it imports nothing else from this package; run it as
``python path/to/slice_hf.py`` where JAX is not installed). This ``__init__`` imports nothing."""
