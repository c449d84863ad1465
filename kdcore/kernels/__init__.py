"""Divergence kernels: ``kinds`` (what they compute), ``native`` (the installed native row
kernels and the dispatch to them), ``chunked`` (the chunked custom-VJP machinery),
``support`` (top-k support rows), ``divergence`` (the per-row maths and the entry points)
and ``fused`` (output head and token losses in one pass)."""
