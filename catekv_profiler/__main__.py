"""``python -m catekv_profiler ...`` runs ``catekv-profile ...`` (where the console script is not installed), but for
``--calibrate``, whose scoring is the evaluation's: ``python -m catekv_eval.calibrate ...`` is the whole command."""

from .cli import main

main(prog_name="catekv-profile")
