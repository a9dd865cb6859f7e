"""Compute kernels. Each kernel has a pure-JAX reference and one dispatch point."""
