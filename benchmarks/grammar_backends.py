"""Grammar libraries for structured outputs, measured on the default model's tokenizer.

xgrammar and llguidance, on SmolLM2-135M-Instruct's tokenizer (49,152 tokens): the one-time
tokenizer preparation, the cold compile time of each schema / regex / choice, and the time to fill
the next-token bitmask per decode step at batch 1 and at batch 32 (every sequence walks the tokens of
a valid answer; at batch 32 the 32 sequences are at different places of different grammars), plus
the time to advance the matchers by one token. Then a correctness probe: JSON texts that `jsonschema`
(with json.loads) judges valid or invalid against small schemas, fed token by token; a library that
accepts an invalid text would let the model generate it. docs/structured-outputs.md explains the choice.

    python benchmarks/grammar_backends.py                   # both libraries, prints a table, writes JSON
    python benchmarks/grammar_backends.py --libs xgrammar --repeats 5

A library that is not installed is skipped (only the chosen one is a genq dependency).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.engine.structured import JSON_OPTIONS  # the engine's JSON layout: ", " and ": "

# Schemas as the tests use them, with a valid answer each (the tokens every matcher walks).
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]+$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string",
                    "pattern": "^[0-9]{5}$"}}, "required": ["city", "zip"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "role", "address", "tags"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^ORD-[0-9]{4}$"},
        "items": {"type": "array", "minItems": 1, "maxItems": 4, "items": {
            "type": "object",
            "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                           "price": {"type": "number"}},
            "required": ["sku", "qty", "price"], "additionalProperties": False}},
        "status": {"enum": ["open", "paid", "shipped"]},
        "gift": {"type": "boolean"},
    },
    "required": ["id", "items", "status", "gift"],
    "additionalProperties": False,
}
CASES = {
    "json:person": ("json", PERSON, json.dumps({"name": "Alice", "age": 31, "role": "admin", "address": {
        "city": "Paris", "zip": "75001"}, "tags": ["a", "bb"]})),
    "json:order": ("json", ORDER, json.dumps({"id": "ORD-0042", "items": [{"sku": "X-1", "qty": 2, "price": 9.5},
                   {"sku": "Y-22", "qty": 1, "price": 120.0}], "status": "paid", "gift": False})),
    "json:any": ("json", None, json.dumps({"answer": [1, 2, {"k": "v"}], "ok": True})),
    "regex:date": ("regex", r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])", "2024-02-29"),
    "choice": ("choice", ["positive", "negative", "neutral"], "neutral"),
}


def cpu_flags() -> str:
    out = subprocess.run(["grep", "-o", r"avx512_bf16\|amx_bf16\|avx512_vnni", "/proc/cpuinfo"],
                         capture_output=True, text=True).stdout.split()
    return " ".join(sorted(set(out))) or "(none of avx512_bf16, amx_bf16, avx512_vnni)"


def _regex_escape(s: str) -> str:
    return "".join("\\" + c if c in r"\.^$|?*+()[]{}/" else c for c in s)


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size, eos):
        import xgrammar as xgr
        self.xgr = xgr
        t = time.perf_counter()
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=eos)
        self.prepare_s = time.perf_counter() - t
        self.vocab_size = vocab_size
        self.batch = xgr.BatchGrammarMatcher(max_threads="auto")

    def compile(self, kind, spec):
        compiler = self.xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        if kind == "json":
            compiled = (compiler.compile_builtin_json_grammar() if spec is None
                        else compiler.compile_json_schema(json.dumps(spec), any_whitespace=False))
        elif kind == "regex":
            compiled = compiler.compile_regex(spec)
        else:
            compiled = compiler.compile_regex("|".join(_regex_escape(c) for c in spec))
        return compiled

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def bitmask(self, batch):
        return self.xgr.allocate_token_bitmask(batch, self.vocab_size)

    def fill(self, matchers, bitmask):
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)

    def fill_par(self, matchers, bitmask):
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def accept(self, m, token) -> bool:
        return m.accept_token(token)

    def can_end(self, m, eos) -> bool:
        return m.accept_token(eos[0])


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab_size, eos):
        import llguidance
        import llguidance.hf
        self.ll = llguidance
        t = time.perf_counter()
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos[0])
        self.prepare_s = time.perf_counter() - t
        self.vocab_size = vocab_size
        self.executor = llguidance.LLExecutor()

    def compile(self, kind, spec):
        M = self.ll.LLMatcher
        if kind == "json":
            grammar = M.grammar_from_json_schema({"type": "object"} if spec is None else spec, defaults=JSON_OPTIONS)
        elif kind == "regex":
            grammar = M.grammar_from_regex(spec)
        else:
            grammar = M.grammar_from_regex("|".join(_regex_escape(c) for c in spec))
        m = M(self.tok, grammar, log_level=0)   # building the matcher compiles the grammar
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def matcher(self, compiled):
        return compiled.deep_copy()

    # the calls the engine makes (worker/engine/structured.py); llguidance.torch's wrappers import torch.compile
    def bitmask(self, batch):
        import torch
        return torch.full((batch, (self.vocab_size + 31) // 32), -1, dtype=torch.int32)

    def fill(self, matchers, bitmask):
        row, base = bitmask.shape[1] * 4, bitmask.data_ptr()
        for i, m in enumerate(matchers):
            m.unsafe_compute_mask_ptr(base + i * row, row)

    def fill_par(self, matchers, bitmask):
        self.executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bitmask.data_ptr(),
                                              bitmask.shape[1] * 4, bitmask.shape[0])

    def accept(self, m, token) -> bool:
        return m.consume_token(token)

    def can_end(self, m, eos) -> bool:
        return m.is_accepting()


def measure(lib, tokenizer, eos, repeats: int, batch: int) -> dict:
    result = {"prepare_tokenizer_ms": lib.prepare_s * 1e3, "compile_ms": {}, "matcher_from_compiled_us": {}}
    compiled, walks = {}, {}
    for name, (kind, spec, answer) in CASES.items():
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            compiled[name] = lib.compile(kind, spec)
            times.append(time.perf_counter() - t)
        result["compile_ms"][name] = statistics.median(times) * 1e3
        t = time.perf_counter()
        for _ in range(100):
            lib.matcher(compiled[name])
        result["matcher_from_compiled_us"][name] = (time.perf_counter() - t) / 100 * 1e6
        walks[name] = tokenizer.encode(answer, add_special_tokens=False)
        m = lib.matcher(compiled[name])
        mask = lib.bitmask(1)
        for tok in walks[name]:
            lib.fill([m], mask)
            assert lib.accept(m, tok), (lib.name, name, "rejects a token of a valid answer")
        assert lib.can_end(m, eos), (lib.name, name, "cannot end after a valid answer")

    # batch 1: one sequence walks each answer, fill + accept per token
    per_case = {}
    for name in CASES:
        fills, accepts = [], []
        for _ in range(repeats):
            m, mask = lib.matcher(compiled[name]), lib.bitmask(1)
            for tok in walks[name]:
                t0 = time.perf_counter()
                lib.fill([m], mask)
                t1 = time.perf_counter()
                lib.accept(m, tok)
                fills.append(t1 - t0)
                accepts.append(time.perf_counter() - t1)
        per_case[name] = {"mask_us": statistics.mean(fills) * 1e6, "mask_p99_us": _p99(fills) * 1e6,
                          "accept_us": statistics.mean(accepts) * 1e6}
    result["batch1"] = per_case
    result["batch1_mask_us"] = statistics.mean(c["mask_us"] for c in per_case.values())
    result["batch1_accept_us"] = statistics.mean(c["accept_us"] for c in per_case.values())

    # batch N: N sequences over the cases, staggered; one step = fill all N masks (+ accept all N)
    names = list(CASES)
    for mode in ("sequential", "parallel"):
        steps, accepts = [], []
        for _ in range(repeats):
            seqs = [(names[i % len(names)], i // len(names)) for i in range(batch)]
            matchers = [lib.matcher(compiled[n]) for n, _ in seqs]
            pos = [0] * batch
            for i, (n, offset) in enumerate(seqs):   # staggered starting points
                for tok in walks[n][:offset % len(walks[n])]:
                    lib.accept(matchers[i], tok)
                    pos[i] += 1
            mask = lib.bitmask(batch)
            for _ in range(24):
                t0 = time.perf_counter()
                (lib.fill if mode == "sequential" else lib.fill_par)(matchers, mask)
                t1 = time.perf_counter()
                for i, (n, _) in enumerate(seqs):
                    if pos[i] == len(walks[n]):       # finished: start the answer again
                        matchers[i], pos[i] = lib.matcher(compiled[n]), 0
                        continue
                    lib.accept(matchers[i], walks[n][pos[i]])
                    pos[i] += 1
                steps.append(t1 - t0)
                accepts.append(time.perf_counter() - t1)
        result[f"batch{batch}_{mode}_mask_us"] = statistics.mean(steps) * 1e6
        result[f"batch{batch}_{mode}_mask_p99_us"] = _p99(steps) * 1e6
        result[f"batch{batch}_accept_us"] = statistics.mean(accepts) * 1e6
    return result


# (schema of the value "v", texts of v): the probe's cases, judged by json.loads + jsonschema
def _obj(**v):
    return {"type": "object", "properties": {"v": v}, "required": ["v"], "additionalProperties": False}


PROBE = [
    (_obj(type="string", maxLength=5), ['"ab"', '"a\\"b"', '"a\\u00e9"', '"a\x08b"', '"abcdef"', '"\\n"']),
    (_obj(type="string", minLength=2), ['"ab"', '"a\x01b"', '"a"', '"a\\tb"']),
    (_obj(type="string"), ['"a\x08b"', '"a\\u00e9"', '"a\\qb"', '"é"']),
    (_obj(type="integer", minimum=0, maximum=120), ["0", "120", "121", "-1", "007", "55"]),
    (_obj(type="integer", exclusiveMinimum=0), ["0", "1", "99999"]),
    (_obj(type="number", minimum=1.5), ["1.5", "1.4", "01", "-0.0", "1."]),
    (_obj(type="string", pattern="^[A-Z][a-z]+$"), ['"Ab"', '"ab"', '"A"', '"Abc1"']),
    (_obj(type="string", format="date"), ['"2024-02-29"', '"2024-13-01"', '"x"']),
    (_obj(enum=["a", 1, None]), ['"a"', "1", "null", '"b"']),
    (_obj(type="array", items={"type": "integer"}, minItems=1, maxItems=2), ["[1]", "[1, 2]", "[]", "[1, 2, 3]"]),
    (_obj(type="array", items={"type": "integer"}, uniqueItems=True), ["[1, 2]", "[1, 1]"]),
    (_obj(anyOf=[{"type": "integer"}, {"type": "string", "maxLength": 2}]), ["1", '"ab"', '"abc"', "true"]),
    (_obj(type="object", properties={"a": {"type": "integer"}}, required=["a"]),
     ['{"a": 1}', "{}", '{"a": 1, "b": 2}']),
    (_obj(const="x"), ['"x"', '"y"']),
    (_obj(type=["integer", "null"]), ["1", "null", '"1"']),
]


def probe(lib, tokenizer, eos) -> dict:
    """Counts: texts accepted though invalid (the library would generate them), valid texts refused
    (it cannot generate them: safe), schemas it refuses to compile."""
    import jsonschema

    out = {"texts": 0, "accepts_invalid": [], "rejects_valid": 0, "refused_schemas": []}
    for schema, values in PROBE:
        try:
            compiled = lib.compile("json", schema)
        except Exception as exc:
            out["refused_schemas"].append(f"{json.dumps(schema['properties']['v'])}: {' '.join(str(exc).split())[:80]}")
            continue
        for value in values:
            text = '{"v": ' + value + '}'
            try:
                jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.FormatChecker())
                valid = True
            except (ValueError, jsonschema.ValidationError):
                valid = False
            m = lib.matcher(compiled)
            ok = all(lib.accept(m, t) for t in tokenizer.encode(text, add_special_tokens=False)) and lib.can_end(m, eos)
            out["texts"] += 1
            if ok and not valid:
                out["accepts_invalid"].append(f"{json.dumps(schema['properties']['v'])} <- {value!r}")
            out["rejects_valid"] += valid and not ok
    return out


def _p99(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * 0.99))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--libs", default="xgrammar,llguidance")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/grammar_backends.json")
    args = ap.parse_args()
    import torch

    from worker.engine.loader import default_model_path, eos_token_ids, hf_dir_for, load_tokenizer

    print(f"CPU flags: {cpu_flags()}; {os.cpu_count()} CPUs; torch threads {torch.get_num_threads()}")
    hf_dir = hf_dir_for(default_model_path())
    tokenizer = load_tokenizer(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    vocab_size = config["vocab_size"]
    eos = sorted(eos_token_ids(hf_dir, None, tokenizer))
    print(f"tokenizer: {hf_dir.name}, {len(tokenizer)} tokens, model vocab {vocab_size}, eos {eos}")
    results = {"cpu_flags": cpu_flags(), "cpus": os.cpu_count(), "libs": {}}
    for cls in (XGrammar, LLGuidance):
        if cls.name not in args.libs.split(","):
            continue
        try:
            lib = cls(tokenizer, vocab_size, eos)
        except ImportError:
            print(f"{cls.name}: not installed, skipped")
            continue
        import importlib.metadata
        version = importlib.metadata.version(cls.name)
        r = measure(lib, tokenizer, eos, args.repeats, args.batch)
        r["version"] = version
        r["probe"] = probe(cls(tokenizer, vocab_size, eos), tokenizer, eos)
        results["libs"][cls.name] = r
        b = args.batch
        print(f"\n{cls.name} {version}: tokenizer prepared once in {r['prepare_tokenizer_ms']:.0f} ms")
        print(f"  {'case':<14}{'compile ms':>12}{'matcher us':>12}{'mask us (b=1)':>15}{'p99 us':>9}{'accept us':>11}")
        for name in CASES:
            c = r["batch1"][name]
            print(f"  {name:<14}{r['compile_ms'][name]:>12.1f}{r['matcher_from_compiled_us'][name]:>12.1f}"
                  f"{c['mask_us']:>15.1f}{c['mask_p99_us']:>9.0f}{c['accept_us']:>11.1f}")
        print(f"  per step, batch 1: mask {r['batch1_mask_us']:.0f} us, accept {r['batch1_accept_us']:.0f} us")
        print(f"  per step, batch {b}: mask {r[f'batch{b}_sequential_mask_us']:.0f} us sequential "
              f"(p99 {r[f'batch{b}_sequential_mask_p99_us']:.0f}), {r[f'batch{b}_parallel_mask_us']:.0f} us "
              f"with the library's threads (p99 {r[f'batch{b}_parallel_mask_p99_us']:.0f}); "
              f"accept all {r[f'batch{b}_accept_us']:.0f} us")
        pr = r["probe"]
        print(f"  correctness probe ({pr['texts']} texts): accepts {len(pr['accepts_invalid'])} invalid, "
              f"refuses {pr['rejects_valid']} valid, refuses {len(pr['refused_schemas'])} schema(s)")
        for line in pr["accepts_invalid"] + [f"refused: {x}" for x in pr["refused_schemas"]]:
            print(f"    {line}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
