"""What the HTTP layer knows about the server: config, the model once loaded, metrics, drain state."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from transformers import PreTrainedTokenizerBase

from serving.api.grammar_check import GrammarCheck, TokenizerSource
from serving.config import ServeConfig
from serving.engine.async_engine import AsyncEngine
from serving.engine.grammar import Grammars
from serving.engine.protocol import AdapterInfo, ModelInfo
from serving.metrics import Metrics


@dataclass(slots=True, frozen=True)
class ServedModel:
    """The model as the API process sees it: facts from the engine process, plus a tokenizer."""

    info: ModelInfo
    tokenizer: PreTrainedTokenizerBase
    reasoning: bool = False  # chat outputs' <think> blocks are returned apart (--reasoning-parser)
    # ... and the tags' token ids, where each is one token: a grammar then holds after the block only.
    think_ids: tuple[int, int] | None = None
    # LoRA adapters by name: --lora-modules', then those loaded at run time (/v1/load_lora_adapter).
    adapters: dict[str, AdapterInfo] = field(default_factory=dict)
    # Ids for adapters loaded at run time: never one an adapter had (prefix-cache blocks are keyed by it).
    adapter_ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    aliases: tuple[str, ...] = ()  # other names of the model (--served-model-name's after the first)

    @classmethod
    def of(
        cls, info: ModelInfo, tokenizer: PreTrainedTokenizerBase, reasoning: bool, think_ids: tuple[int, int] | None,
        aliases: tuple[str, ...] = (),
    ) -> ServedModel:  # fmt: skip
        first = max((a.id for a in info.adapters), default=0) + 1
        adapters = {a.name: a for a in info.adapters}
        return cls(info, tokenizer, reasoning, think_ids, adapters, itertools.count(first), aliases)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def names(self) -> list[str]:
        """What clients may send as `model`: the model's name and aliases, then its LoRA adapters'."""
        return [self.info.name, *self.aliases, *self.adapters]

    def adapter_id(self, name: str | None) -> int | None:
        """SamplingParams.adapter for a request's `model`: 0 for the model itself (or no name), None for a
        name served here by nothing."""
        if name is None or name == self.info.name or name in self.aliases:
            return 0
        adapter = self.adapters.get(name)
        return None if adapter is None else adapter.id

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size


@dataclass
class AppState:
    config: ServeConfig
    metrics: Metrics
    executor: ThreadPoolExecutor
    started: int = field(default_factory=lambda: int(time.time()))
    model: ServedModel | None = None
    engine: AsyncEngine | None = None
    load_error: str | None = None
    draining: bool = False
    in_flight: int = 0
    _token_text: dict[int, str] = field(default_factory=dict)
    _grammars: Grammars | None = None
    _special: frozenset[int] | None = None
    grammar_check: GrammarCheck = field(init=False)
    adapter_changes: asyncio.Lock = field(default_factory=asyncio.Lock)  # /v1/load_lora_adapter and unload

    def __post_init__(self) -> None:
        self.grammar_check = GrammarCheck(self.tokenizer_source)

    @property
    def most_sequences(self) -> int:
        """The most sequences one request may ask for (prompts times n): all of them can be let in on an idle
        server, a full batch decoding and a full queue waiting; more would be a 429 however long one waited."""
        return self.config.max_batch_size + self.config.queue_capacity

    def tokenizer_source(self) -> TokenizerSource:
        """The served model's tokenizer as grammars see it: its vocabulary and the token that ends a text."""
        assert self.model is not None
        tokenizer = self.model.tokenizer
        stop = (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
        return TokenizerSource(tokenizer, self.model.vocab_size, stop)

    @property
    def grammars(self) -> Grammars:
        """xgrammar's reading of the tokenizer, for the tokens' bytes (requests' grammars are compiled in
        grammar_check's processes)."""
        if self._grammars is None:
            source = self.tokenizer_source()
            self._grammars = Grammars(lambda: source.tokenizer, source.vocab_size, source.stop_token_ids)
        return self._grammars

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Tokens that generated text leaves out (it is decoded skipping special tokens)."""
        if self._special is None:
            assert self.model is not None
            self._special = frozenset(self.model.tokenizer.all_special_ids)
        return self._special

    def token_bytes(self, token_id: int) -> bytes:
        """A token's own bytes (logprobs' "bytes" fields), which join into the text even where a
        character spans tokens. Reads a table built on first use: build it off the event loop first
        (`await st.run_blocking(st.grammars.token_bytes)`)."""
        table = self.grammars.token_bytes()
        if 0 <= token_id < len(table):
            return table[token_id]
        return self.token_text(token_id).encode()

    @property
    def ready(self) -> bool:
        return self.model is not None and self.engine is not None and self.engine.healthy and not self.draining

    async def run_blocking(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Tokenizer and template work runs on the worker threads, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, partial(fn, *args, **kwargs))

    def token_text(self, token_id: int, alone: bool = False) -> str:
        """A token's text as it reads mid-sentence (logprobs' "token" fields), or at the start of a
        text (`alone`).

        Decoded behind an anchor token: SentencePiece tokenizers drop a token's leading space
        when it is decoded alone, so " there" would come out as "there"."""
        if alone:
            assert self.model is not None
            return self.model.tokenizer.decode([token_id])
        text = self._token_text.get(token_id)
        if text is None:
            assert self.model is not None
            tok = self.model.tokenizer
            anchor = tok.encode("a", add_special_tokens=False)[-1:]
            prefix = tok.decode(anchor)
            joined = tok.decode(anchor + [token_id])
            text = joined[len(prefix) :] if joined.startswith(prefix) else tok.decode([token_id])
            self._token_text[token_id] = text
        return text
