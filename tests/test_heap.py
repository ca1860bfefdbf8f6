"""keep_freed_blocks: batches reuse the heap instead of faulting pages in."""

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
# batches, and counts the page faults of those ten.
PROGRAM = """
import json, logging, resource, sys, tempfile
import torch
import kerntrace as kt
from kerntrace.heap import keep_freed_blocks
from kerntrace.models import SmallCNN

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
print(json.dumps({"kept": keep_freed_blocks(), "faults": faults}))
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
def test_featurizing_batches_reuses_freed_blocks_without_page_faults():
    plain, _ = run(KERNTRACE_KEEP_HEAP="0")
    kept, log = run()
    assert kept["kept"] and not plain["kept"]
    # Measured: 2,600-3,200 page faults a batch when malloc hands the
    # activations back to the kernel, under 40 when it keeps them.
    assert plain["faults"] > 5000, (plain, kept)
    assert kept["faults"] < plain["faults"] / 10, (plain, kept)
    assert "set KERNTRACE_KEEP_HEAP=0 to leave malloc alone" in log


def test_the_opt_out_leaves_malloc_alone():
    result, log = run(KERNTRACE_KEEP_HEAP="0")
    assert not result["kept"]
    assert "malloc's thresholds left as they are" in log
