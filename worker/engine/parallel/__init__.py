"""Tensor parallelism: one engine over N processes (GPUs), each holding a shard of every layer
and of the KV cache. See docs/tensor-parallel.md."""
from worker.engine.parallel.executor import TensorParallelError, TensorParallelExecutor
from worker.engine.parallel.sharding import ShardPlan, Sharder

__all__ = ["TensorParallelError", "TensorParallelExecutor", "ShardPlan", "Sharder"]
