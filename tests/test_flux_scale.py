"""benchmarks/flux_scale.py: refused on a CPU; its measurements run end to end on a shrunken FLUX on the CPU."""

import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "flux_scale.py"

# The benchmark's own run() at a few layers and 64 px, in a process of its own (it starts a process group).
SHRUNKEN_RUN = f"""
import argparse, importlib.util, torch
spec = importlib.util.spec_from_file_location("flux_scale", {str(BENCHMARK)!r})
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
transformer = dict(bench.FLUX_DEV_TRANSFORMER, num_layers=1, num_single_layers=1, num_attention_heads=2,
                   attention_head_dim=16, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
vae = dict(bench.FLUX_DEV_VAE, block_out_channels=(32, 32, 32, 32), layers_per_block=1)
bench.T5_TOKENS = 8
args = argparse.Namespace(size=64, sample_steps=2, groups=1, k=2, rank=4, draws=2, steps=2, warmup=1, repeats=1,
                          no_gradient_checkpointing=False)
device = torch.device("cpu")
results = bench.run(device, args, transformer, vae)
bench.report(results, args, device)
"""


def test_a_cpu_is_refused_with_a_message():
    result = subprocess.run([sys.executable, str(BENCHMARK)], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "needs a CUDA GPU" in result.stderr


def test_the_measurements_run_on_a_shrunken_flux():
    result = subprocess.run([sys.executable, "-c", SHRUNKEN_RUN], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("generation:") and "images/s at 2 steps" in line for line in lines)
    live, cached = (next(line.split() for line in lines if line.startswith(name)) for name in ("live ", "cached "))
    assert float(live[1]) > 0 and float(cached[1]) > 0  # samples/s of both steps
    assert any(line.startswith("reference cache:") and "(2 draws, float16)" in line for line in lines)
