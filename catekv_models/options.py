"""The ``--device`` and ``--dtype`` options of every command that loads a model (profile, catekv-eval, catekv-serve).

Values as :func:`catekv_models.load_model` takes them; "auto" is resolved by :func:`catekv_models.resolve_device`
and :func:`catekv_models.resolve_dtype`.
"""

import click

DEVICE_OPTION = click.option("--device", default="auto", show_default=True,
                             help="cpu, cuda, cuda:1, ... (auto: cuda if available).")
DTYPE_OPTION = click.option("--dtype", default="auto", show_default=True,
                            help="float32, bfloat16 or float16 (auto: float32 on CPU, bfloat16 on CUDA).")
