"""Fused ops. One module per op family: reference (oracle), Triton kernels, registration."""
