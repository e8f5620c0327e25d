"""Infinite-width convolutional kernels: fused closed form and the neural-tangents path."""
