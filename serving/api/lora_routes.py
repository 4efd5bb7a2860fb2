"""LoRA adapters loaded and unloaded while the server runs, with vLLM's routes and bodies
(/v1/load_lora_adapter, /v1/unload_lora_adapter: what KubeAI and vLLM's own tooling call). Off unless
the server was started with --allow-runtime-lora-updating: the routes read any path on the server's disk.
"""

from __future__ import annotations

from pydantic import Field
from quart import Blueprint

from serving.api.errors import APIError, bad_request
from serving.api.generation import engine_api_error
from serving.api.openapi import documented
from serving.api.responses import ModelCard
from serving.api.routes import model_card, parse_body, state
from serving.api.schemas import _Body
from serving.api.state import AppState
from serving.config import ConfigError, LoraModule
from serving.download.errors import DownloadError, ExitCode
from serving.engine.async_engine import EngineStoppedError
from serving.engine.protocol import AdapterInfo, RequestRejected
from serving.models.source import resolve_adapter

bp = Blueprint("lora", __name__)


class LoadLoraAdapterRequest(_Body):
    lora_name: str = Field(min_length=1, description="the name requests will send as `model`")
    lora_path: str = Field(min_length=1, description="a PEFT adapter's directory on the server, or a Hub id")
    load_inplace: bool = Field(False, description="replace an adapter of that name (else a name already served is a 400)")


class UnloadLoraAdapterRequest(_Body):
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = Field(None, description="vLLM's; accepted and not needed")


def _allowed(st: AppState) -> None:
    if not st.config.allow_runtime_lora_updating:
        raise APIError(
            404, "Runtime LoRA updates are off: start the server with --allow-runtime-lora-updating", code="not_found"
        )


@bp.post("/v1/load_lora_adapter")
@documented(LoadLoraAdapterRequest, ModelCard, (400, 404))
async def load_lora_adapter():
    """Load a LoRA adapter (vLLM's route)

    The adapter (PEFT's format, from a directory on the server or a Hub repo) is served under
    lora_name from now on, beside the model and its other adapters. Needs --allow-runtime-lora-updating.
    """
    st = state()
    _allowed(st)
    req = await parse_body(LoadLoraAdapterRequest)
    assert st.model is not None and st.engine is not None
    if req.lora_name in (st.model.name, *st.model.aliases):
        raise bad_request(f"{req.lora_name!r} is the served model's name", param="lora_name")
    async with st.adapter_changes:  # one at a time: a load and an unload of one name must not interleave
        old = st.model.adapters.get(req.lora_name)
        if old is not None and not req.load_inplace:
            raise bad_request(f"The lora adapter '{req.lora_name}' has already been loaded.", param="lora_name")
        if old is None and len(st.model.adapters) >= st.config.max_loras:
            raise bad_request(
                f"{len(st.model.adapters)} adapters are served, --max-loras {st.config.max_loras}: unload one first",
                param="lora_name",
            )
        try:
            directory = await st.run_blocking(resolve_adapter, st.config, LoraModule(name=req.lora_name, path=req.lora_path))
        except ConfigError as exc:
            raise bad_request(str(exc), param="lora_path") from None
        except DownloadError as exc:
            if exc.exit_code == ExitCode.NETWORK:
                raise APIError(503, f"the Hub could not be reached: {exc}", type="server_error", code="hub_unreachable") from None
            raise bad_request(str(exc), param="lora_path") from None
        adapter_id = next(st.model.adapter_ids)
        try:
            rank = await st.engine.load_adapter(adapter_id, str(directory), req.lora_name)
        except RequestRejected as exc:
            raise bad_request(f"The lora adapter '{req.lora_name}' cannot be served: {exc}", param="lora_path") from None
        except EngineStoppedError as exc:
            raise engine_api_error(exc) from None
        st.model.adapters[req.lora_name] = AdapterInfo(req.lora_name, adapter_id, req.lora_path, rank)
        if old is not None:
            st.engine.unload_adapter(old.id)
    return model_card(st, req.lora_name)


@bp.post("/v1/unload_lora_adapter")
@documented(UnloadLoraAdapterRequest, ModelCard, (400, 404))
async def unload_lora_adapter():
    """Unload a LoRA adapter (vLLM's route)

    Its name is a 404 from now on; requests already running with it finish with it. Needs
    --allow-runtime-lora-updating.
    """
    st = state()
    _allowed(st)
    req = await parse_body(UnloadLoraAdapterRequest)
    assert st.model is not None and st.engine is not None
    async with st.adapter_changes:  # one at a time: a load and an unload of one name must not interleave
        if req.lora_name not in st.model.adapters:
            raise APIError(404, f"The lora adapter '{req.lora_name}' cannot be found.", param="lora_name", code="model_not_found")
        card = model_card(st, req.lora_name)
        st.engine.unload_adapter(st.model.adapters.pop(req.lora_name).id)
    return card
