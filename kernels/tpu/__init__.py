"""Pallas kernels for TPU (Mosaic); they run on CPU in TPU interpret mode."""
