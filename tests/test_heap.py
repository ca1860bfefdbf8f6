"""The heap: batches reuse freed blocks instead of faulting pages in."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="mallopt is glibc's",
)

# Featurizes ten batches of 100 through the small CNN, after two warm-up
# batches, and counts the page faults of those ten; then allocates 600 MiB
# in 4 MiB blocks between small long-lived ones, frees the large blocks and
# reads the resident memory; then finalizes and reads it again.
PROGRAM = """
import json, logging, resource, sys, tempfile
import torch
import kerntrace as kt
from kerntrace.models import SmallCNN

def resident():
    with open("/proc/self/status") as status:
        line = next(l for l in status if l.startswith("VmRSS"))
    return int(line.split()[1]) >> 10

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
torch.manual_seed(0)
model = SmallCNN(28).eval()
x, y = torch.randn(1200, 784), torch.randint(0, 10, (1200,))
traker = kt.TRAKer(
    model, "image_classification", 1200, tempfile.mkdtemp(), proj_dim=512,
    device="cpu",
)
traker.load_checkpoint(model.state_dict(), model_id=0)
for start in range(0, 1200, 100):
    if start == 200:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    part = (x[start : start + 100], y[start : start + 100])
    traker.featurize(part, num_samples=100)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
base = resident()
large, small = [], []
for _ in range(150):
    large.append(torch.ones(1 << 20))
    small.append(torch.ones(1000))
del large
freed = resident()
traker.finalize_features()
print(json.dumps({"faults": faults, "kept_after_free": freed - base}))
"""


def run(**env: str) -> tuple[dict, str]:
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@glibc
def test_batches_reuse_freed_blocks_and_the_callers_blocks_still_go_back():
    plain, _ = run(KERNTRACE_KEEP_HEAP="0")
    kept, log = run()
    # Measured: 2,600-3,200 page faults a batch when malloc hands the
    # activations back to the kernel, under 200 (the store's pages) when it
    # keeps them.
    assert plain["faults"] > 5000, (plain, kept)
    assert kept["faults"] < plain["faults"] / 10, (plain, kept)
    assert "set KERNTRACE_KEEP_HEAP=0 to leave malloc alone" in log
    # Between batches the caller's 4 MiB blocks are mmapped as glibc's
    # defaults have them, so freeing them gives the 600 MiB back.
    assert kept["kept_after_free"] < 64, (plain, kept)


def test_the_opt_out_leaves_malloc_alone():
    _, log = run(KERNTRACE_KEEP_HEAP="0")
    assert "malloc's thresholds left as they are" in log
    assert "leave malloc alone" not in log
