"""Exporters (above ``checkpoint``, which holds only the formats): ``elastic`` (slice a budget out of
a nested checkpoint, the elastic HF export, storage measurement) and ``hf_recipe`` (the axes table
rendered per HF tensor). ``slice_hf`` cuts one budget out of an elastic HF export with torch +
safetensors only (of this package it imports only the standard-library errors/manifest/outputs
modules, so it runs where JAX is not installed). This ``__init__`` imports nothing."""
