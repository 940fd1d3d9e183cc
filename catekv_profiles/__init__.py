"""The profiles shipped with catekv, as package data: ``NAME.safetensors``, its model card ``NAME.md`` and its head
map ``NAME.png``; README.md says how each was made.

A package so that the same lookup (``importlib.resources``, in :func:`catekv_runtime.list_profiles` and
``load_profile(NAME)``) finds them in a source checkout, an editable install and an installed wheel. No code.
"""
