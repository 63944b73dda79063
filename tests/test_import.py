"""`import genforge` costs what torch and timm cost: it registers the gf_ backbones and loads
nothing else (no diffusers, no pipelines) until a name is used."""

import subprocess
import sys

PROBE = """
import sys, timm, genforge
assert timm.is_model("gf_moat_nano")
heavy = sorted(m for m in ("diffusers", "genforge.pipelines", "genforge.distill", "genforge.kd",
                           "genforge.methods", "torch_fidelity", "accelerate") if m in sys.modules)
assert not heavy, heavy
from diffusers import DiffusionPipeline
assert genforge.DiMRModel.__module__ == "genforge.models.dimr"  # diffusers resolves components here
assert genforge.distill.__name__ == "genforge.distill"
print("ok")
"""


def test_import_genforge_registers_the_backbones_and_loads_nothing_heavy():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
