"""Which constrained-decoding library: llguidance, xgrammar or outlines-core, measured.

For the SmolLM2-135M vocabulary (49,152 tokens, the embedded default model) and GPT-2's
(50,257), each library is given the same raw token bytes and special tokens, then:
  - tokenizer setup: building the library's vocabulary object (once per model);
  - compile: turning a JSON schema into the library's grammar (once per request);
  - mask: the allowed-token mask at each step while a valid instance of the schema is fed
    token by token (median and 95th percentile per token; the engine pays this each step);
  - coverage: for each JSON Schema feature, a schema using it must compile, accept a
    valid instance and reject an invalid one (fed as tokens). "no" = refused at compile,
    "loose" = compiled but the invalid instance went through.

Run: PYTHONPATH=src python benchmarks/constraint_libraries.py [--gguf PATH]
Prints a Markdown table; docs/structured.md keeps the figures with the date and load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from pocketlm.tokenizer import Tokenizer
from pocketlm.tokenizer.common import special_texts

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 4},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["name", "age", "role", "address", "tags", "score"],
    "additionalProperties": False,
}
INSTANCE = {
    "name": "Ada Lovelace",
    "age": 36,
    "role": "admin",
    "address": {"city": "London", "zip": "W1"},
    "tags": ["math", "engines", "poetry"],
    "score": 0.97,
}

# feature -> (schema, valid instance, invalid instance)
FEATURES = {
    "nested objects": (
        {"type": "object", "properties": {"a": {"type": "object", "properties": {
            "b": {"type": "integer"}}, "required": ["b"]}}, "required": ["a"]},
        {"a": {"b": 1}}, {"a": {"b": "x"}},
    ),
    "minItems/maxItems": (
        {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3},
        [1, 2], [1, 2, 3, 4],
    ),
    "enum": ({"enum": ["red", "green"]}, "red", "blue"),
    "number bounds": ({"type": "integer", "minimum": 1, "maximum": 9}, 5, 12),
    "required": (
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
        {"a": 1}, {},
    ),
    "additionalProperties false": (
        {"type": "object", "properties": {"a": {"type": "integer"}},
         "additionalProperties": False},
        {"a": 1}, {"a": 1, "b": 2},
    ),
    "$ref/$defs": (
        {"$defs": {"P": {"type": "object", "properties": {"x": {"type": "integer"}},
                         "required": ["x"]}},
         "type": "array", "items": {"$ref": "#/$defs/P"}},
        [{"x": 1}], [{"y": 1}],
    ),
    "anyOf": ({"anyOf": [{"type": "integer"}, {"type": "boolean"}]}, True, "s"),
    "pattern": ({"type": "string", "pattern": "^[a-z]{3}-[0-9]{2}$"}, "abc-12", "ab-123"),
    "string length": ({"type": "string", "minLength": 2, "maxLength": 4}, "abc", "abcdef"),
    "format date-time": (
        {"type": "string", "format": "date-time"}, "2024-01-02T03:04:05Z", "yesterday",
    ),
    "format email": ({"type": "string", "format": "email"}, "a@b.co", "not an email"),
    "recursive $ref": (
        {"$defs": {"T": {"type": "object", "properties": {"c": {"type": "array", "items": {
            "$ref": "#/$defs/T"}}}, "required": ["c"], "additionalProperties": False}},
         "$ref": "#/$defs/T"},
        {"c": [{"c": []}]}, {"c": [{"d": []}]},
    ),
}  # fmt: skip


def load_tokenizers(gguf: Path) -> dict[str, Tokenizer]:
    from pocketlm.weights.gguf import read_gguf

    return {
        "SmolLM2 (49,152)": Tokenizer.from_gguf_metadata(read_gguf(gguf).metadata),
        "GPT-2 (50,257)": Tokenizer.gpt2(),
    }


def raw_vocab(tok: Tokenizer) -> tuple[list[bytes], set[int]]:
    """Every token's bytes, and the ids of special tokens (never part of JSON text)."""
    return [tok.token_bytes(i) for i in range(tok.vocab_size)], set(special_texts(tok._backend))


# -- one adapter per library: setup(tok) -> ctx; compile(ctx, schema) -> grammar;
#    matcher(ctx, grammar) -> m; mask(m) computes the next mask; feed(m, t) -> ok --


class Llguidance:
    name = "llguidance 1.9.1"

    def setup(self, tok: Tokenizer):
        import llguidance

        return llguidance.LLTokenizer(tok._backend.to_str(), eos_token=sorted(tok.eos_ids))

    def compile(self, ctx, schema):
        import llguidance

        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False}
        )
        bad, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, ctx)
        if bad:
            raise ValueError(messages[0])
        return grammar

    def matcher(self, ctx, grammar):
        import llguidance
        import llguidance.torch

        m = llguidance.LLMatcher(ctx, grammar, log_level=0)
        self.bitmask = llguidance.torch.allocate_token_bitmask(1, ctx.vocab_size)
        return m

    def mask(self, m):
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(m, self.bitmask)

    def feed(self, m, token):
        return m.consume_token(token)


class Xgrammar:
    name = "xgrammar 0.2.9"

    def setup(self, tok: Tokenizer):
        import xgrammar

        vocab, special = raw_vocab(tok)
        # xgrammar takes an empty token as a special one (never allowed inside the grammar).
        vocab = [b"" if i in special else v for i, v in enumerate(vocab)]
        info = xgrammar.TokenizerInfo(vocab, stop_token_ids=sorted(tok.eos_ids))
        return xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False), info

    def compile(self, ctx, schema):
        return ctx[0].compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(",", ":")
        )

    def matcher(self, ctx, grammar):
        import xgrammar

        self.bitmask = xgrammar.allocate_token_bitmask(1, ctx[1].vocab_size)
        return xgrammar.GrammarMatcher(grammar)

    def mask(self, m):
        m.fill_next_token_bitmask(self.bitmask)

    def feed(self, m, token):
        return m.accept_token(token)


class OutlinesCore:
    name = "outlines-core 0.2.14"

    def setup(self, tok: Tokenizer):
        import outlines_core

        vocab, special = raw_vocab(tok)
        eos = min(tok.eos_ids)
        table: dict[bytes, list[int]] = {}
        for i, piece in enumerate(vocab):
            if i not in special and piece:
                table.setdefault(piece, []).append(i)
        return outlines_core.Vocabulary(eos, table), len(vocab)

    def compile(self, ctx, schema):
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema

        return outlines_core.Index(build_regex_from_schema(json.dumps(schema)), ctx[0])

    def matcher(self, ctx, grammar):
        import outlines_core

        self.bitmask = torch.zeros((ctx[1] + 31) // 32, dtype=torch.int32)
        return outlines_core.Guide(grammar)

    def mask(self, m):
        b = self.bitmask
        m.write_mask_into(b.data_ptr(), b.numel(), b.element_size())

    def feed(self, m, token):
        try:
            m.advance(token)
        except ValueError:
            return False
        return True


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def instance_tokens(tok: Tokenizer, value) -> list[int]:
    return tok.encode(json.dumps(value, separators=(",", ":")))


def run_instance(lib, ctx, grammar, tokens: list[int], *, times: list[float] | None = None):
    """Feed `tokens`, computing the mask before each; True when every token was allowed."""
    m = lib.matcher(ctx, grammar)
    for t in tokens:
        start = time.perf_counter()
        lib.mask(m)
        if times is not None:
            times.append(time.perf_counter() - start)
        if not lib.feed(m, t):
            return False
    return True


def coverage(lib, ctx, tok: Tokenizer) -> dict[str, str]:
    result = {}
    for feature, (schema, good, bad) in FEATURES.items():
        try:
            grammar = lib.compile(ctx, schema)
        except Exception as error:  # noqa: BLE001 - any refusal counts as "no"
            result[feature] = "no: " + " ".join(str(error).split())[:60]
            continue
        if not run_instance(lib, ctx, grammar, instance_tokens(tok, good)):
            result[feature] = "rejects valid"
        elif run_instance(lib, ctx, grammar, instance_tokens(tok, bad)):
            result[feature] = "loose"
        else:
            result[feature] = "yes"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path.home() / ".local/share/pocketlm/models/smollm2-135m"
    parser.add_argument("--gguf", type=Path, default=default / "SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {os.getloadavg()}")
    libs = [Llguidance(), Xgrammar(), OutlinesCore()]
    for vocab_name, tok in load_tokenizers(args.gguf).items():
        tokens = instance_tokens(tok, INSTANCE)
        print(f"\n## {vocab_name}: the instance is {len(tokens)} tokens\n")
        print(
            "| library | tokenizer setup | schema compile | mask per token: median | mean | p95 |"
        )
        print("|---|---|---|---|---|---|")
        for lib in libs:
            ctx, setup = timed(lib.setup, tok)
            compiles, times = [], []
            for _ in range(args.repeats):
                # compile = the grammar and a matcher on it (llguidance builds in the latter)
                grammar, seconds = timed(lib.compile, ctx, SCHEMA)
                compiles.append(seconds + timed(lib.matcher, ctx, grammar)[1])
                assert run_instance(lib, ctx, grammar, tokens, times=times), lib.name
            p95 = statistics.quantiles(times, n=20)[-1]
            print(f"| {lib.name} | {setup * 1e3:.0f} ms | {min(compiles) * 1e3:.1f} ms | "
                  f"{statistics.median(times) * 1e6:.0f} us | {statistics.mean(times) * 1e6:.0f} us | "
                  f"{p95 * 1e6:.0f} us |")  # fmt: skip
        if vocab_name.startswith("SmolLM2"):
            table = {lib.name: coverage(lib, lib.setup(tok), tok) for lib in libs}
            print("\n| JSON Schema feature | " + " | ".join(table) + " |")
            print("|---|" + "---|" * len(table))
            for feature in FEATURES:
                print(f"| {feature} | " + " | ".join(t[feature] for t in table.values()) + " |")


if __name__ == "__main__":
    main()
