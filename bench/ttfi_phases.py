"""Where a fresh `ldm sample` process spends its time: imports, load, accelerate, first image.

    python bench/ttfi_phases.py MODEL_DIR [auto|none|graphs|compile]
"""

import json
import sys
import time

t0 = time.perf_counter()
from ldm_cli import cli  # noqa: E402,F401  (what the console script imports)
from ldm_cli.accel import accelerate  # noqa: E402
from ldm_cli.config import Job, Settings  # noqa: E402
from ldm_cli.generate import Output, generate  # noqa: E402
from ldm_cli.models import load_components  # noqa: E402

t1 = time.perf_counter()
import torch  # noqa: E402

torch.empty(1, device="cuda")  # CUDA context
torch.cuda.synchronize()
t_cuda = time.perf_counter()
c = load_components(sys.argv[1], device="cuda")
torch.cuda.synchronize()
t2 = time.perf_counter()
accelerate(c, sys.argv[2] if len(sys.argv) > 2 else "auto")
t3 = time.perf_counter()
generate(c, [Job("a cat", 1, Settings(steps=50, cfg=7.5))], Output(__import__("pathlib").Path("/tmp/phases")), 1)
torch.cuda.synchronize()
t4 = time.perf_counter()
generate(c, [Job("a cat", 2, Settings(steps=50, cfg=7.5))], Output(__import__("pathlib").Path("/tmp/phases")), 1)
torch.cuda.synchronize()
t5 = time.perf_counter()
print(json.dumps(dict(mode=sys.argv[2:] or ["auto"], imports_s=round(t1 - t0, 2), cuda_init_s=round(t_cuda - t1, 2),
                      load_s=round(t2 - t_cuda, 2),
                      accelerate_s=round(t3 - t2, 2), first_image_s=round(t4 - t3, 2),
                      second_image_s=round(t5 - t4, 2), total_to_first_png_s=round(t4 - t0, 2))))
