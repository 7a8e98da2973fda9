"""LLMEngine: one step = schedule, run the model, sample, update. Not thread-safe: one thread owns it."""
from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from pathlib import Path

import torch

from kernels import cpu_kernels
from worker.engine.config import DEFAULT_GPU_MEMORY_UTILIZATION, EngineConfig
from worker.engine.detokenizer import IncrementalDetokenizer
from worker.engine.host_memory import move_to_huge_pages, retain_freed_memory
from worker.engine.kv_cache_manager import KVCacheManager
from worker.engine.loader import cache_root, eos_token_ids, hf_dir_for, load_model, load_tokenizer, resolve_model
from worker.engine.model_runner import ModelRunner
from worker.engine.models.llama import prepack_cpu_weights
from worker.engine.outputs import CompletionOutput, RequestOutput
from worker.engine.parallel import TensorParallelError, TensorParallelExecutor
from worker.engine.request import Request, Sequence, check_weight
from worker.engine.sampler import Sampler, seed_generator
from worker.engine.sampling_params import SamplingParams
from worker.engine.scheduler import Scheduler, SchedulerOutput
from worker.engine.stats import EngineStats
from worker.engine.structured import StructuredOutputs

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LLMEngine:
    def __init__(self, model: str | os.PathLike | None = None, **engine_kwargs):
        """`engine_kwargs`: the other EngineConfig fields (dtype, device, block_size, ...; docs/engine.md)."""
        config = self.config = EngineConfig.from_kwargs(model=None if model is None else str(model), **engine_kwargs)
        cache = cache_root(config.cache_dir)
        cpu_kernels.set_cache_dir(cache / "kernels")
        path = resolve_model(model)
        hf_dir = hf_dir_for(path, cache)
        self.model_path = path
        self.model_name = path.stem if path.is_file() else path.name
        self.device = torch.device(config.device)
        if self.device.type == "cpu":
            retain_freed_memory()
        self.dtype = TORCH_DTYPES[config.dtype]
        self.tokenizer = load_tokenizer(hf_dir)
        self.tp: TensorParallelExecutor | None = None   # ranks 1..N-1 when tensor_parallel_size > 1
        self.model, hf_config = self._load_model(hf_dir)
        if self.device.type == "cpu" and self.tp is None:
            if config.kernel_impl in (None, "cpu"):
                prepack_cpu_weights(self.model)
            # every decode step streams the weights: on 2 MB pages, a TLB miss per 2 MB, not per 4 KB
            move_to_huge_pages(self.model)
        args = self.model.args
        num_blocks = self.config.num_kv_blocks or self._kv_blocks_for_budget(args)
        model_limit = args.max_position_embeddings
        self.max_model_len = min(config.max_model_len or model_limit, model_limit)
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.kv, self._new_sequence)
        runner_args = (self.model, num_blocks, config.block_size, self.dtype, self.device, config.kernel_impl)
        self.runner = self.tp.make_runner(*runner_args) if self.tp else ModelRunner(*runner_args)
        if self.tp is None:
            self.scheduler.one_call_tokens = self.runner.one_call_tokens()
        self.eos_token_ids = eos_token_ids(hf_dir, hf_config, self.tokenizer)
        self.sampler = Sampler(self.eos_token_ids, config.seed, self.device, compiled=config.kernel_impl in (None, "cpu"))
        self.structured = StructuredOutputs(self.tokenizer, args.vocab_size, self.eos_token_ids)
        self.requests: dict[str, Request] = {}
        self._grammar_waiting: dict[str, Request] = {}   # requests whose grammar is being compiled
        self._pending: list[RequestOutput] = []   # outputs of aborts, handed out by the next step
        self.step_hook = None                      # test-only: called with each SchedulerOutput before the model runs
        self.counters = {"steps": 0, "prompt_tokens": 0, "generation_tokens": 0, "max_batch_size": 0,
                         "failed_steps": 0}

    def _load_model(self, hf_dir: Path):
        max_positions = self.config.max_model_len or 1 << 30   # load_model clamps it to the model's limit
        if self.config.tensor_parallel_size == 1:
            return load_model(hf_dir, self.dtype, self.device, max_positions)
        self.tp = TensorParallelExecutor(self.config, hf_dir, max_positions)
        try:
            return load_model(hf_dir, self.dtype, self.device, max_positions, apply_sharding=self.tp.sharder)
        except BaseException:
            self.tp.shutdown()
            raise

    def _kv_blocks_for_budget(self, args) -> int:
        per_block = (2 * args.num_hidden_layers * self.config.block_size * args.num_key_value_heads
                     * args.head_dim * self.dtype.itemsize)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * DEFAULT_GPU_MEMORY_UTILIZATION)
        else:
            budget = self.config.kv_cache_bytes
        blocks = budget // per_block
        if blocks < 1:
            raise ValueError(f"a KV cache budget of {budget} bytes holds no block of {per_block} bytes")
        return int(blocks)

    # -- requests -------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        ids = list(prompt)
        vocab = self.model.args.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        return ids

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    priority: int = 0, tenant: str | None = None, weight: float = 1.0) -> None:
        """`tenant`: whose request this is, for fair sharing (None: the anonymous tenant ""); `weight`:
        its share relative to other tenants' (> 0; InvalidWeightError, a ValueError, otherwise)."""
        params = params or SamplingParams()
        weight = check_weight(weight)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        ids = self.encode(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        total = len(ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = {total} "
                             f"exceeds max_model_len ({self.max_model_len})")
        capacity = self.kv.pool.num_blocks * self.kv.block_size
        if total > capacity:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = {total} "
                             f"exceeds the whole KV cache ({capacity} tokens)")
        request = Request(request_id, prompt if isinstance(prompt, str) else None, ids, params, priority,
                          tenant=tenant, weight=weight)
        constraint = params.structured
        if constraint is not None:   # compiled off this thread; the scheduler skips it until then
            request.grammar = self.structured.compile(*constraint)
            request.grammar_pending = True
            self._grammar_waiting[request_id] = request
        self.requests[request_id] = request
        self.scheduler.add(self._new_sequence(request, 0, list(ids)))

    def _new_sequence(self, request: Request, index: int, token_ids: list[int]) -> Sequence:
        p = request.params
        seq = Sequence(
            request=request, index=index, token_ids=token_ids,
            detok=IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, p.stop, p.skip_special_tokens),
            generator=None if p.seed is None else seed_generator(p.seed, index, self.device),
            logprobs=[] if p.logprobs is not None else None)
        if index > 0 and request.seqs and request.seqs[0].grammar is not None:
            seq.grammar = request.seqs[0].grammar.fork()   # a fork copies the matcher as it shares blocks
        request.seqs.append(seq)
        return seq

    def abort_request(self, request_id: str) -> None:
        """Stop a request now: its blocks are free before the next step; the next step's outputs
        report it with finish_reason 'abort'. Unknown or finished ids are ignored."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        self._grammar_waiting.pop(request_id, None)
        for seq in request.seqs:
            if not seq.finished:
                self.scheduler.finish(seq, "abort")
        self._pending.append(self._output(request, finished=True))

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._pending)

    def starts_cold(self) -> bool:
        """Whether the next step would only start requests: some are waiting, no sequence is running
        or was preempted mid-generation (its stream is waiting for its next token), and no output is
        pending (an abort's, say)."""
        return (bool(self.requests) and not self.scheduler.running and not self._pending
                and not any(seq.num_output_tokens for seq in self.scheduler.waiting))

    # -- the step -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        if self._grammar_waiting:
            outputs += self._resolve_grammars()
        batch = self.scheduler.schedule()
        if batch.empty:
            if self._grammar_waiting and not outputs:   # only compiles to wait for: do not spin
                concurrent.futures.wait([r.grammar for r in self._grammar_waiting.values()], timeout=0.02,
                                        return_when=concurrent.futures.FIRST_COMPLETED)
            return outputs
        try:
            if self.step_hook is not None:
                self.step_hook(batch)
            masks = self.structured.masks(batch.samples) if self.structured.in_use else None
            started = time.perf_counter()
            logits, row_of = self.runner.run(batch)
            sampled = self.sampler(logits, batch.samples, row_of, masks) if batch.samples else []
            self.scheduler.observe_step(batch.num_batched_tokens, time.perf_counter() - started)
        except TensorParallelError:
            raise   # a lost rank takes the whole engine down, not just this step's requests
        except Exception as exc:  # a faulty step fails its requests, not the engine
            log.exception("engine step failed; failing %d request(s)", len({s.seq.request.request_id for s in batch.scheduled}))
            return outputs + self._fail(batch, exc)
        return outputs + self._update(batch, sampled, masks)

    def _update(self, batch: SchedulerOutput, sampled, masks=None) -> list[RequestOutput]:
        c = self.counters
        c["steps"] += 1
        c["max_batch_size"] = max(c["max_batch_size"], len(batch.scheduled))
        for item in batch.scheduled:
            seq = item.seq
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                c["prompt_tokens"] += min(item.num_new_tokens, seq.num_prompt_tokens - seq.num_computed_tokens)
            # its tenant pays for the prompt tokens computed (not those found in the prefix cache), once:
            # not again when a preemption recomputes them
            start = max(seq.num_computed_tokens, seq.charged_prompt_tokens)
            seq.num_computed_tokens += item.num_new_tokens
            end = min(seq.num_computed_tokens, seq.num_prompt_tokens)
            if end > start:
                self.scheduler.charge(seq, end - start, 0)
                seq.charged_prompt_tokens = end
            self.kv.cache_computed_blocks(seq)
        touched: dict[str, Request] = {}
        for i, ((seq, _), (token, logprobs)) in enumerate(zip(batch.samples, sampled)):
            if seq.finished:
                continue                      # its request failed earlier in this loop
            if token is None:                 # its grammar allows no token (or failed): the request fails
                self._drop_failed(seq.request, f"StructuredOutputError: {masks.dead[i]}")
            else:
                self.scheduler.charge(seq, 0, 1)
                self._append(seq, token, logprobs)
            touched[seq.request.request_id] = seq.request
        c["generation_tokens"] += len(batch.samples)
        outputs = []
        for request in touched.values():
            finished = request.finished
            outputs.append(self._output(request, finished))
            if finished:
                self.requests.pop(request.request_id, None)
        return outputs

    def _append(self, seq: Sequence, token: int, logprobs) -> None:
        p = seq.request.params
        seq.append(token)
        if logprobs is not None:
            seq.logprobs.append(logprobs)
        grammar = seq.grammar
        if grammar is not None and not grammar.accept(token):   # cannot happen: the mask allowed it
            self._drop_failed(seq.request, f"StructuredOutputError: the grammar rejected token {token}")
            return
        n = seq.num_output_tokens
        reason = None
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            reason = "stop"
        elif grammar is not None and grammar.terminated:   # EOS where the grammar ends, even with ignore_eos
            reason = "stop"
        elif seq.detok.add(token, check_stop=n >= p.min_tokens) is not None:
            reason = "stop"
        elif n >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None:
            if seq.detok.pending:
                seq.detok.flush()
            self.scheduler.finish(seq, reason)

    def _fail(self, batch: SchedulerOutput, exc: Exception) -> list[RequestOutput]:
        self.counters["failed_steps"] += 1
        requests = {s.seq.request.request_id: s.seq.request for s in batch.scheduled}
        requests.update((seq.request.request_id, seq.request) for seq, _ in batch.samples)
        outputs = []
        for request in requests.values():
            request.error = f"{type(exc).__name__}: {exc}"
            for seq in request.seqs:
                if not seq.finished:
                    self.scheduler.finish(seq, "abort")
            self.requests.pop(request.request_id, None)
            outputs.append(self._output(request, finished=True))
        return outputs

    def _resolve_grammars(self) -> list[RequestOutput]:
        """Requests whose compile is done: ready to schedule, or failed alone with the library's message."""
        outputs = []
        for request_id, request in list(self._grammar_waiting.items()):
            future = request.grammar
            if not future.done():
                continue
            del self._grammar_waiting[request_id]
            try:
                compiled = future.result()
            except Exception as exc:
                log.info("request %s: structured output rejected: %s", request_id, exc)
                outputs.append(self._fail_request(request, f"{type(exc).__name__}: {exc}"))
                continue
            request.grammar = compiled
            request.grammar_pending = False
            for seq in request.seqs:          # sample 0 only: the others fork from it later
                seq.grammar = self.structured.new_state(compiled)
        return outputs

    def _fail_request(self, request: Request, error: str) -> RequestOutput:
        """One request fails alone: finished with reason 'abort' and `error`, as a failed step's are."""
        self._drop_failed(request, error)
        return self._output(request, finished=True)

    def _drop_failed(self, request: Request, error: str) -> None:
        request.error = error
        for seq in request.seqs:
            if not seq.finished:
                self.scheduler.finish(seq, "abort")
        self.requests.pop(request.request_id, None)
        self._grammar_waiting.pop(request.request_id, None)

    def _output(self, request: Request, finished: bool) -> RequestOutput:
        completions = []
        for seq in request.seqs:
            new_ids = seq.token_ids[seq.num_prompt_tokens + seq.sent_tokens:]
            seq.sent_tokens = seq.num_output_tokens
            new_text = seq.detok.take_new_text(seq.finished)
            completions.append(CompletionOutput(
                index=seq.index, text=seq.detok.text[:seq.detok.emitted], token_ids=seq.output_token_ids,
                finish_reason=seq.finish_reason, logprobs=None if seq.logprobs is None else list(seq.logprobs),
                new_token_ids=new_ids, new_text=new_text))
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, completions,
                             finished, request.num_cached_tokens, request.error)

    def stats(self) -> EngineStats:
        pool = self.kv.pool
        return EngineStats(**self.scheduler.stats(), kv_blocks_used=pool.num_used, kv_blocks_total=pool.num_blocks,
                           prefix_cache_hits=pool.hits, prefix_cache_queries=pool.queries,
                           preemptions=self.scheduler.num_preemptions,
                           shared_steps=self.scheduler.num_shared_steps, **self.counters,
                           **(self.tp.stats() if self.tp else {}))

    def tenant_tokens(self) -> dict[str, int]:
        """Tokens served per tenant so far (prompt tokens computed + output tokens; fair sharing's input)."""
        return dict(self.scheduler.vtc.served)

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks, if any. The engine cannot step afterwards."""
        self.structured.shutdown()
        if self.tp is not None:
            self.tp.shutdown()
