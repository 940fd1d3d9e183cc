"""catekv-serve's command line: bad input is one line on stderr and exit code 2, found before any model loads."""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("click") is None, reason="needs click")

BAD = {
    "missing --profile": (["smollm2-135m"], "--profile"),
    "missing MODEL": (["--profile", "none"], "MODEL"),
    "unknown profile": (["smollm2-135m", "--profile", "no-such-profile"], "no-such-profile"),
    "port out of range": (["smollm2-135m", "--profile", "none", "--port", "70000"], "--port"),
    "no slots": (["smollm2-135m", "--profile", "none", "--max-batch-size", "0"], "--max-batch-size"),
    "negative waiting": (["smollm2-135m", "--profile", "none", "--max-waiting", "-1"], "--max-waiting"),
    "memory fraction over 1": (["smollm2-135m", "--profile", "none", "--gpu-memory-utilization", "1.5"],
                               "--gpu-memory-utilization"),
    "memory fraction on a CPU": (["smollm2-135m", "--profile", "none", "--device", "cpu",
                                  "--gpu-memory-utilization", "0.5"], "--gpu-memory-utilization"),
    "bad device": (["smollm2-135m", "--profile", "none", "--device", "toaster"], "--device"),
    "bad dtype": (["smollm2-135m", "--profile", "none", "--device", "cpu", "--dtype", "float7"], "--dtype"),
    "FlashAttention-4 on a CPU": (["smollm2-135m", "--profile", "none", "--device", "cpu", "--prefill-backend", "fa4"],
                                  "--prefill-backend"),
    "unknown prefill backend": (["smollm2-135m", "--profile", "none", "--prefill-backend", "xformers"],
                                "--prefill-backend"),
    "empty API key": (["smollm2-135m", "--profile", "none", "--device", "cpu", "--api-key", " "], "--api-key"),
    "missing model folder": (["./no-such-model-folder", "--profile", "none", "--device", "cpu"],
                             "no-such-model-folder"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_code_2(case, capsys, monkeypatch):
    from catekv_serve import cli

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    args, named = BAD[case]
    if case != "missing model folder":
        monkeypatch.setattr("catekv_models.load_model", no_model)
    with pytest.raises(SystemExit) as exited:
        cli.main(args)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("Error: ") and named in err, err


def test_prefill_backend_choices_are_the_runtime_s():
    """The option lists what the runtime offers (written out, so that --help needs no torch import)."""
    from catekv_runtime.attention import PREFILL_BACKENDS
    from catekv_serve import cli

    option = next(p for p in cli.serve.params if p.name == "prefill_backend")
    assert tuple(option.type.choices) == PREFILL_BACKENDS


def test_help_exits_0(capsys):
    from catekv_serve import cli

    with pytest.raises(SystemExit) as exited:
        cli.main(["--help"])
    assert exited.value.code == 0
    assert "--profile" in capsys.readouterr().out
