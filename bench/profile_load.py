"""cProfile of load_components on CUDA (a fresh process), top functions by cumulative time.

    python bench/profile_load.py MODEL_DIR
"""

import cProfile
import pstats
import sys
import time

import torch

from ldm_cli.models import load_components

torch.empty(1, device="cuda")
for attempt in (1, 2):
    t0 = time.perf_counter()
    profile = cProfile.Profile()
    profile.enable()
    load_components(sys.argv[1], device="cuda")
    torch.cuda.synchronize()
    profile.disable()
    print(f"load {attempt}: {time.perf_counter() - t0:.2f} s", flush=True)
    pstats.Stats(profile).sort_stats("cumulative").print_stats(25)
