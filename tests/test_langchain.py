"""LangChain's ChatOpenAI against the server: with_structured_output and bind_tools work unmodified.
Needs the `langchain` extra (pip install -e '.[langchain]'); skipped with that reason without it."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field

from tests.server_util import TEST_CHAT_TEMPLATE, RunningServer

langchain_openai = pytest.importorskip("langchain_openai", reason="the langchain extra is not installed")

MODEL = "stories260k"


class Pet(BaseModel):
    name: str = Field(max_length=10)
    kind: str = Field(json_schema_extra={"enum": ["cat", "dog"]})


@pytest.fixture(scope="module")
def server():
    with RunningServer(chat_template=TEST_CHAT_TEMPLATE) as s:
        yield s


@pytest.fixture(scope="module")
def chat(server):
    return langchain_openai.ChatOpenAI(base_url=server.base_url + "/v1", api_key="unused", model=MODEL, max_tokens=120,
                                       temperature=0, max_retries=0)  # fmt: skip


def test_embeddings(server):
    """OpenAIEmbeddings as LangChain documents it for servers other than OpenAI's: texts sent as they are
    (by default it sends tiktoken's token ids, which only OpenAI's models read)."""
    import openai

    embeddings = langchain_openai.OpenAIEmbeddings(
        base_url=server.base_url + "/v1", api_key="unused", model=MODEL, check_embedding_ctx_length=False, max_retries=0
    )
    texts = ["Once upon a time", "there was a cat"]
    vectors = embeddings.embed_documents(texts)
    direct = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused").embeddings.create(model=MODEL, input=texts)
    # equal up to float rounding: how the engine batches the two texts with other work may change the matmul's order
    assert len(vectors) == 2 and len(vectors[0]) > 1
    for got, want in zip(vectors, direct.data, strict=True):
        assert got == pytest.approx(want.embedding, abs=1e-5)
    assert embeddings.embed_query(texts[1]) == pytest.approx(vectors[1], abs=1e-5)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output(chat, method):
    pet = chat.with_structured_output(Pet, method=method).invoke("Name a pet")
    assert isinstance(pet, Pet) and pet.kind in ("cat", "dog")


def test_bind_tools(chat):
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return "sunny"

    message = chat.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Paris?")
    (call,) = message.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"].get("city"), str)


def test_chat_ollama_and_its_structured_output(server):
    """LangChain's ChatOllama, pointed at the server as at an Ollama: a chat, and with_structured_output's JSON
    schema (Ollama's format), validated into the model."""
    langchain_ollama = pytest.importorskip("langchain_ollama", reason="langchain-ollama is not installed")
    chat = langchain_ollama.ChatOllama(base_url=server.base_url, model=MODEL, temperature=0, num_predict=40)
    assert chat.invoke("Tell me a story").content
    pet = chat.with_structured_output(Pet, method="json_schema").invoke("Name a pet")
    assert isinstance(pet, Pet) and pet.kind in ("cat", "dog")
    vectors = langchain_ollama.OllamaEmbeddings(base_url=server.base_url, model=MODEL).embed_documents(["Once upon a time"])
    assert len(vectors) == 1 and len(vectors[0]) > 1
