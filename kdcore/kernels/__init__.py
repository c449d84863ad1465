"""Divergence kernels: per-row maths and the chunked custom-VJP machinery."""
