"""Triton kernels for GPU, called from JAX through jax-triton (optional `gpu` extra)."""
