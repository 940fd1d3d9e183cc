"""``python -m catekv_profiler ...`` runs ``catekv-profile ...`` (where the console script is not installed)."""

from .cli import main

main(prog_name="catekv-profile")
