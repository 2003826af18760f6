"""The small sweep the fault and cluster tests run: the smoke sweep's DDPM, no FID or bits/dim, 16 samples."""
import os

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_sweep(path, name: str, steps: int, checkpoint_every: int = 0, **sweep_keys) -> str:
    """Write the sweep file ``path`` (``sweep_keys``: grid, variants, max_concurrent, ...) and return its path."""
    smoke = yaml.safe_load(open(os.path.join(ROOT, "sweeps", "smoke.yaml")))
    base = {**smoke["base"], **smoke["variants"]["ddpm"]}
    base["train"] = {**base["train"], "steps": steps, "log_every": 10, "checkpoint_every": checkpoint_every}
    base["sample"] = {**base["sample"], "n": 16, "batch_size": 16, "grid": 0}
    base["eval"] = {"fid": False, "bpd": False}
    path.write_text(yaml.safe_dump({"name": name, "base": base, **sweep_keys}))
    return str(path)
