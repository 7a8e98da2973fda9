"""genq's inference engine: continuous batching over a paged KV cache. Usable on its own."""
from worker.engine.llm import LLM
from worker.engine.llm_engine import LLMEngine
from worker.engine.outputs import CompletionOutput, RequestOutput
from worker.engine.sampling_params import SamplingParams, StructuredOutputError

__all__ = ["LLM", "LLMEngine", "SamplingParams", "StructuredOutputError", "RequestOutput", "CompletionOutput"]
