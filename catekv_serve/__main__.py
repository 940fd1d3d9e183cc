"""``python -m catekv_serve`` runs ``catekv-serve``."""

from .cli import main

main()
