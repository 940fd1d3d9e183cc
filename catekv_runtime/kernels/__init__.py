"""Optional GPU kernels. Nothing here is imported with ``catekv_runtime``: the submodules import
Triton, which the runtime core must not need. Import them explicitly, e.g.
``from catekv_runtime.kernels.triton_decode import decode_attention``.
"""
