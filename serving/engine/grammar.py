"""Grammar-constrained decoding with xgrammar: a sequence with a grammar only samples tokens the grammar
allows, so its output always parses (a JSON object, JSON valid under a schema).

Why xgrammar: it is what vLLM and SGLang use by default; it compiles a JSON schema against our tokenizers
in milliseconds (the 512-token demo: 1.4 ms; cached per schema afterwards), its per-step mask is one
bitmask tensor for the whole batch applied in place on CPU or CUDA, and rows without a grammar are left
untouched, so unconstrained sequences pay nothing. llguidance was the other candidate; it is not measured
here yet (see the issue's note).

Both processes use it: the API compiles a request's grammar first, so that a schema the library refuses is
a 400 naming the problem before any response starts; the engine compiles again (cached) in a worker
thread, off its step loop, and keeps one matcher per sequence.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from serving.models.host_inputs import to_device

# ("json_object", ""), ("json_schema", the schema as canonical JSON), ("regex", a pattern) or
# ("choice", a JSON list of the strings allowed).
GrammarSpec = tuple[str, str]
# Compiled grammars kept, by the bytes xgrammar says they take: a JSON schema's is kilobytes, an enum of
# 600 long strings' over 100 MB. Counted by number (and xgrammar's own compiler cache, unbounded, beside
# it), a client sending such enums, each new, grew the engine by that much per request.
CACHE_BYTES = 512 << 20


class GrammarError(ValueError):
    """The grammar cannot be compiled: the message says why."""


def json_schema_spec(schema: dict[str, Any]) -> GrammarSpec:
    # Keys keep their order: the grammar writes an object's properties in the order the schema lists them.
    return ("json_schema", json.dumps(schema, separators=(",", ":")))


JSON_OBJECT: GrammarSpec = ("json_object", "")


def choice_spec(options: list[str]) -> GrammarSpec:
    return ("choice", json.dumps(list(options)))


class Grammars:
    """Compiled grammars for one tokenizer, cached by spec; the tokenizer is loaded on first use."""

    def __init__(
        self, tokenizer: Callable[[], Any], vocab_size: int, stop_token_ids: tuple[int, ...], cache_bytes: int = CACHE_BYTES
    ):
        self._tokenizer, self.vocab_size, self._stop = tokenizer, vocab_size, list(stop_token_ids)
        self._cache_bytes = cache_bytes
        self._cached_bytes = 0
        self._compiler: Any = None
        self._info: Any = None
        self._bytes: list[bytes] | None = None
        self._cache: OrderedDict[GrammarSpec, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def _get_info(self) -> Any:
        import xgrammar as xgr

        with self._lock:
            if self._info is None:
                self._info = xgr.TokenizerInfo.from_huggingface(
                    self._tokenizer(), vocab_size=self.vocab_size, stop_token_ids=self._stop or None
                )
            return self._info

    def _get_compiler(self) -> Any:
        import xgrammar as xgr

        info = self._get_info()
        with self._lock:
            if self._compiler is None:
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)  # ours is bounded
            return self._compiler

    def token_bytes(self) -> list[bytes]:
        """Each token's bytes, by id (xgrammar reads them from the tokenizer's byte-level or
        byte-fallback vocabulary: a token holding half a UTF-8 character has those bytes, not U+FFFD)."""
        if self._bytes is None:
            self._bytes = list(self._get_info().decoded_vocab)
        return self._bytes

    def cached(self, spec: GrammarSpec) -> bool:
        """Whether `spec` is compiled already (compile would return at once)."""
        with self._lock:
            return spec in self._cache

    def compile(self, spec: GrammarSpec) -> Any:
        """The compiled grammar (cached), or GrammarError."""
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
        compiler = self._get_compiler()
        kind, text = spec
        try:
            if kind == "json_object":  # OpenAI's JSON mode: any JSON object (not an array), no runaway whitespace
                compiled = compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            elif kind == "json_schema":
                compiled = compiler.compile_json_schema(text, any_whitespace=False)
            elif kind == "regex":
                compiled = compiler.compile_regex(text)
            elif kind == "choice":
                options = json.loads(text)
                compiled = compiler.compile_grammar("root ::= " + " | ".join(json.dumps(o) for o in options))
            else:
                raise GrammarError(f"unknown grammar kind {kind!r}")
        except GrammarError:
            raise
        except Exception as exc:  # xgrammar reports schema problems as RuntimeError/ValueError
            raise GrammarError(_first_line(str(exc))) from exc
        size = compiled.memory_size_bytes
        with self._lock:
            if spec not in self._cache and size <= self._cache_bytes:
                self._cache[spec] = compiled
                self._cached_bytes += size
                while self._cached_bytes > self._cache_bytes:
                    self._cached_bytes -= self._cache.popitem(last=False)[1].memory_size_bytes
        return compiled

    def submit(self, spec: GrammarSpec) -> Future:
        """Compile in a worker thread (the engine's step loop must not wait for a large schema)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")
        return self._pool.submit(self.compile, spec)

    @staticmethod
    def matcher(compiled: Any) -> Any:
        import xgrammar as xgr

        return xgr.GrammarMatcher(compiled)


def apply_masks(logits: torch.Tensor, matchers: list[Any | None], also: list[int | None] | None = None) -> torch.Tensor:
    """Mask each constrained row to the tokens its grammar allows next (one bitmask for the batch), and
    the row's token in `also` where it names one (a think block's opening); rows without a matcher are
    returned unchanged. `logits` is [len(matchers), vocab], float32."""
    import xgrammar as xgr

    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return logits
    logits = logits.float().contiguous().clone()
    bitmask = xgr.allocate_token_bitmask(len(matchers), logits.shape[-1])
    for i in rows:
        matchers[i].fill_next_token_bitmask(bitmask, i)
        if also is not None and (token := also[i]) is not None:
            word, bit = divmod(token, 32)  # the mask's int32 words hold 32 tokens each, low bit first
            flag = 1 << bit
            bitmask[i, word] = int(bitmask[i, word]) | (flag - (1 << 32) if flag >= 1 << 31 else flag)
    xgr.apply_token_bitmask_inplace(logits, to_device(bitmask, logits.device), indices=rows)
    return logits


def _first_line(message: str) -> str:
    """xgrammar's messages start with a source location: keep what it says."""
    line = message.strip().splitlines()[0] if message.strip() else "the grammar could not be compiled"
    return line.split(": ", 1)[1] if line.startswith("[") and ": " in line else line
