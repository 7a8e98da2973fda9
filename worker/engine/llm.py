"""LLM: offline batch generation over an LLMEngine, the way vLLM's `LLM` is used."""
from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq

from worker.engine.llm_engine import LLMEngine
from worker.engine.outputs import RequestOutput
from worker.engine.sampling_params import SamplingParams

_calls = itertools.count()


class LLM:
    def __init__(self, model=None, **engine_args):
        self.engine = LLMEngine(model, **engine_args)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts, params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: int | Seq[int] = 0) -> list[RequestOutput]:
        """prompts: a string, a list of token ids, or a list of either. Returns one finished
        RequestOutput per prompt, in order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params_list = self._per_prompt(params or SamplingParams(), len(prompts), "params")
        priorities = self._per_prompt(priority, len(prompts), "priority")
        call = next(_calls)
        ids = [f"llm-{call}-{i}" for i in range(len(prompts))]
        for rid, prompt, p, prio in zip(ids, prompts, params_list, priorities):
            self.engine.add_request(rid, prompt, p, prio)
        done: dict[str, RequestOutput] = {}
        bar = _progress(len(prompts)) if use_tqdm else None
        try:
            while len(done) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
                if not self.engine.has_unfinished_requests() and len(done) < len(ids):
                    raise RuntimeError("engine stopped with requests unfinished")
        except BaseException:
            for rid in ids:
                self.engine.abort_request(rid)
            self.engine.step()
            raise
        finally:
            if bar is not None:
                bar.close()
        return [done[rid] for rid in ids]

    def chat(self, conversations, params: SamplingParams | Seq[SamplingParams] | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """conversations: one list of {role, content} messages, or a list of them."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts = [self.engine.apply_chat_template(list(m)) for m in conversations]
        return self.generate(prompts, params, use_tqdm)

    @staticmethod
    def _per_prompt(value, n: int, name: str) -> list:
        if isinstance(value, (list, tuple)):
            if len(value) != n:
                raise ValueError(f"{name}: got {len(value)} values for {n} prompts")
            return list(value)
        return [value] * n


def _progress(total: int):
    from tqdm import tqdm
    return tqdm(total=total, desc="generate", unit="req", leave=False)
