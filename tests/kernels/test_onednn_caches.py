"""`import ember` bounds torch's oneDNN primitive caches, so calls with ever new row counts (a server's
prompt steps) stop adding memory; a capacity the environment names is kept."""
import json
import os
import subprocess
import sys

import pytest
import torch

from heap import HAS_MALLINFO2
from ember.kernels.onednn import CACHE_CAPACITY_VARIABLES, PRIMITIVE_CACHE_CAPACITY

pytestmark = [pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch was built without oneDNN"),
              pytest.mark.skipif(not HAS_MALLINFO2, reason="needs glibc's mallinfo2 (2.33+)")]

# oneDNN's float32 matmul through ember's kernel, one call per row count (each a new primitive); the
# memory malloc holds for live allocations (not RSS, which also keeps freed holes) after every 100 calls
CHILD = """
import json, os, sys
sys.path.insert(0, TESTS_DIR)
import ember, torch
from ember.kernels.linear.base import LinearWeights
from ember.kernels.linear.dense import ONEDNN_F32
from ember.kernels.linear.spec import LinearSpec
from heap import live_heap_mib

torch.set_num_threads(2)
spec = LinearSpec(in_features=576, out_features=1536)
packed = ONEDNN_F32.prepare(spec, LinearWeights(weight=torch.randn(1536, 576)), torch.float32)
x = torch.randn(1000, 576)
ONEDNN_F32.run(x, spec, packed)
marks = []
for rows in range(600, 1000):
    ONEDNN_F32.run(x[:rows], spec, packed)
    if rows % 100 == 99:
        marks.append(live_heap_mib())
print(json.dumps({"live_mib": marks, "capacities": [os.environ[name] for name in NAMES]}))
""".replace("NAMES", repr(CACHE_CAPACITY_VARIABLES)).replace("TESTS_DIR", repr(os.path.dirname(os.path.dirname(__file__))))


def _child(env_overrides: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CACHE_CAPACITY_VARIABLES}
    env.update(env_overrides)
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_new_row_counts_stop_adding_memory_under_the_bound():
    bounded = _child({})
    assert bounded["capacities"] == [str(PRIMITIVE_CACHE_CAPACITY)] * 2
    # oneDNN's own default, 1024 entries in each cache: every row count's primitive stays alive
    unbounded = _child({name: "1024" for name in CACHE_CAPACITY_VARIABLES})
    assert unbounded["capacities"] == ["1024", "1024"]
    growth = {name: run["live_mib"][-1] - run["live_mib"][1] for name, run in
              (("bounded", bounded), ("unbounded", unbounded))}  # the last 200 row counts, past the first 64
    assert growth["unbounded"] > 50, unbounded  # ~0.6 MiB a primitive: the workload shows what is kept
    assert growth["bounded"] < 5, bounded


def test_a_capacity_the_environment_names_is_kept():
    env = {**os.environ, "LRU_CACHE_CAPACITY": "8"}
    env.pop("ONEDNN_PRIMITIVE_CACHE_CAPACITY", None)
    code = "import os, ember; print(os.environ['LRU_CACHE_CAPACITY'], os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["8", str(PRIMITIVE_CACHE_CAPACITY)], done.stderr
