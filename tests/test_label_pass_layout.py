"""The labeling pass's block size and its writers' imports (no Ray cluster needed)."""

import subprocess
import sys

from stpp_ray.cluster.label import batches_per_block


def test_blocks_hold_a_shard_of_batches_on_large_pools_and_spread_small_ones():
    assert batches_per_block(200_000, 64, 256, 2) == 4  # a shard's worth: 256 rows
    assert batches_per_block(200_000, 64, 1024, 32) == 16
    assert batches_per_block(64 * 40, 64, 1024, 2) == 5  # 40 batches: 8 blocks, 4 per actor
    assert batches_per_block(100, 64, 256, 2) == 1  # fewer batches than 4 per actor
    assert batches_per_block(10_000, 64, 16, 2) == 1  # shards smaller than a batch
    assert batches_per_block(0, 64, 256, 1) == 1


def test_the_shard_sink_unpickles_without_importing_torch():
    # Every write task imports the sink's module; torch there cost seconds per task.
    code = "import sys, stpp_ray.cluster.shard_sink; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
