"""Attention and KV-cache kernels over the paged cache, each with a numba.cuda and a CPU
implementation behind one dispatching function (see ../shared/DESIGN.md, "Kernel entry points").

This package imports nothing from `inflightd`.
"""
