"""Kernel families, one file each: the C++ op wrappers (``cpp.py``) and the Triton kernels."""
