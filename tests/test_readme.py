"""The README's custom-head example runs as printed and trains from the command line."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import torch

from lmheads.heads import base, registered_heads
from lmheads.reporting import parameter_counts

from .helpers import ROOT, fit, only_run, scalars


def test_readme_custom_head_trains_through_the_cli(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    (tmp_path / "my_heads.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
        command = [sys.executable, "-m", "lmheads", "heads", "my_heads"]
        result = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
        assert "scaled_tied" in result.stdout and "my_heads.ScaledTied" in result.stdout
        cli = fit(tmp_path, "--model.head=my_heads.ScaledTied", steps=3, every=3)
        assert "scaled_tied" in registered_heads()
        assert only_run(tmp_path).name.startswith("scaled_tied-seed0-")
        assert "val/loss" in scalars(only_run(tmp_path))
        head = cli.model.head
        state = cli.trainer.optimizers[0].state[head.scale]  # the optimizer trained the new parameter
        assert state["step"] == 3 and state["exp_avg"] != 0
        assert parameter_counts(cli.model)["head_own"] == 1
        idx = torch.randint(0, 1024, (1, 8))
        h = cli.model.backbone(idx)
        torch.testing.assert_close(cli.model(idx), head.scale * h @ cli.model.backbone.wte.weight.T)
    finally:
        base._REGISTRY.pop("scaled_tied", None)
        sys.modules.pop("my_heads", None)
