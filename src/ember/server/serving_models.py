"""The model names a request may send: the base model and the LoRA adapters loaded under their own names
(vLLM's OpenAIServingModels), with the load and unload endpoints' logic."""

from __future__ import annotations

import itertools
import time
from typing import Any

from ember.lora.request import LoRARequest
from ember.server.async_engine import AsyncEngine
from ember.server.errors import APIError


class ServingModels:
    """Adapter names -> `LoRARequest`s. Adapters are checked when registered and take an engine slot only
    when a request first uses them.

    Args:
        lora_paths: `--lora-modules` as {name: PEFT directory}; checked by `check_startup_adapters`.
    """

    def __init__(self, lora_paths: dict[str, str]) -> None:
        self._ids = itertools.count(1)
        self.lora_requests = {name: LoRARequest(name, next(self._ids), path) for name, path in lora_paths.items()}

    def check_startup_adapters(self, engine: Any) -> None:
        """On the engine thread, before serving: every `--lora-modules` adapter must load (ValueError)."""
        for request in self.lora_requests.values():
            engine.check_lora(request)

    def resolve(self, model: str | None, base_name: str) -> LoRARequest | None:
        """The adapter a request's `model` names; None for the base model (or no name). Unknown: 404."""
        if model is None or model == base_name:
            return None
        if model in self.lora_requests:
            return self.lora_requests[model]
        raise APIError(f"The model `{model}` does not exist.", 404, "model")

    async def load(self, async_engine: AsyncEngine, lora_name: str, lora_path: str) -> None:
        """Register an adapter after reading and checking it on the engine thread (a bad one is a 400)."""
        if not lora_name or not lora_path:
            raise APIError("both lora_name and lora_path must be given", 400)
        if lora_name in self.lora_requests:
            raise APIError(f"The lora adapter '{lora_name}' has already been loaded.", 400, "lora_name")
        request = LoRARequest(lora_name, next(self._ids), lora_path)
        await async_engine.call(lambda engine: engine.check_lora(request))
        if lora_name in self.lora_requests:  # registered by a concurrent call meanwhile
            raise APIError(f"The lora adapter '{lora_name}' has already been loaded.", 400, "lora_name")
        self.lora_requests[lora_name] = request

    async def unload(self, async_engine: AsyncEngine, lora_name: str) -> None:
        """Forget an adapter: new requests may not name it; its slot is freed once idle."""
        if self.lora_requests.pop(lora_name, None) is None:
            raise APIError(f"The lora adapter '{lora_name}' cannot be found.", 404, "lora_name")
        await async_engine.call(lambda engine: engine.release_lora(lora_name))

    def cards(self, base_name: str, root: str, max_model_len: int) -> list[dict]:
        """/v1/models entries: the base model, then each adapter with the base as its parent."""
        created = int(time.time())
        base = {"id": base_name, "object": "model", "created": created, "owned_by": "ember", "root": root,
                "parent": None, "max_model_len": max_model_len}
        return [base] + [{"id": name, "object": "model", "created": created, "owned_by": "ember",
                          "root": request.lora_path, "parent": base_name, "max_model_len": max_model_len}
                         for name, request in self.lora_requests.items()]
