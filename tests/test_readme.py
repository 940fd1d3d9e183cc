"""README's claims about the set-up and the runtime example, run as written."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def python_block_with(text: str) -> str:
    """The README's ```python block that contains ``text``."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README, re.S) if text in b]
    assert len(blocks) == 1, f"{len(blocks)} python blocks of README.md contain {text!r}"
    return blocks[0]


def test_setup_output_is_git_ignored():
    """The set-up writes its profile into the repository root; git must not see it as untracked."""
    setup = re.search(r"```bash\n(pip install .*?)\n```", README, re.S).group(1)
    output = re.search(r"catekv-profile \S+ -o (\S+)", setup).group(1)
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    for path in (output, f"{output}.ckpt/sample_00000.safetensors"):  # the profile and its checkpoints
        done = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO)
        assert done.returncode == 0, f"{path} is not ignored by .gitignore"


@pytest.mark.slow
def test_runtime_example_loads_an_embedded_model(smollm2):
    """The example of loading an embedded GGUF model with the public loader runs as written, then generates."""
    namespace: dict = {}
    exec(python_block_with("from catekv_models import load_model"), namespace)
    model, tokenizer, ck = namespace["model"], namespace["tokenizer"], namespace["ck"]
    assert namespace["info"] == smollm2[2] and not model.training
    ids = torch.tensor([tokenizer.encode("The capital of France is")])
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert out.shape == (1, ids.shape[1] + 3)
    ck.remove(model)
