"""The worker side of prefill/decode disaggregation: full prompt blocks' KV moved between an engine's
cache and the KV pool (`KVTransfer`), and the worker that prefills into the pool or admits from it
(`PDWorker`).

A block travels as its rows for every layer, K and V: [num_layers, 2, block_size, KVH, D] in the
cache dtype, flattened to bytes. Imported blocks become ordinary cached prefix blocks of the engine, so
its own prefix-cache lookup serves them and only the rest of the prompt is computed.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from ember.distributed.block_keys import block_keys
from ember.distributed.worker import EngineWorker, StepResult
from ember.sampling_params import SamplingParams

logger = logging.getLogger("ember.distributed")

# A prefill worker's request: compute the prompt's KV and stop (its one token is not the caller's).
PREFILL_PARAMS = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)


@dataclass
class TransferRecord:
    """KV moved for one request by one worker: "export" (cache -> pool) or "import" (pool -> cache)."""

    request_id: str
    direction: str
    num_blocks: int
    num_bytes: int
    seconds: float


@dataclass
class PDStepResult(StepResult):
    """A step of a `PDWorker`: the caller's outputs (prefills' own are held back) and what moved."""

    prefilled: list[str] = field(default_factory=list)  # requests whose prompt KV is now in the pool
    transfers: list[TransferRecord] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # requests this worker could not take: error


def check_pd_config(config) -> None:
    """Raise ValueError for `EngineConfig` options the KV transfer cannot serve."""
    if config.kv_cache_dtype != "auto":
        raise ValueError(f"prefill/decode disaggregation moves KV in the model dtype; kv_cache_dtype "
                         f"{config.kv_cache_dtype!r} is not supported (use auto)")
    if not config.enable_prefix_caching or config.kv_eviction != "none":
        raise ValueError("prefill/decode disaggregation needs prefix caching on and no --kv-eviction")
    if config.speculative_config is not None and config.speculative_config.method == "draft_model":
        raise ValueError("prefill/decode disaggregation does not move a draft model's KV; use ngram or suffix speculation")
    if config.enable_lora:
        raise ValueError("LoRA adapters are not supported with prefill/decode disaggregation")


class KVTransfer:
    """Exports an engine's full prompt blocks to a KV pool and imports the ones it lacks.

    Args:
        engine: the worker's `LLMEngine`; its KV cache must be in the model dtype, with prefix caching on.
        pool: a KV pool client (`ember.distributed.kv_pool`).

    Raises:
        ValueError: options `check_pd_config` refuses: a quantized KV cache (codes and scales do not move
            yet), prefix caching off (also by --kv-eviction), a draft model (its own KV cache would miss the
            imported blocks), LoRA; a model whose sliding-window layers keep block tables of their own (run it
            with --disable-hybrid-kv-cache-manager).
    """

    def __init__(self, engine, pool) -> None:
        check_pd_config(engine.config)
        spec = engine.kv_spec
        if spec.groups:
            raise ValueError("prefill/decode disaggregation moves one block table per request; this model's "
                             "sliding-window layers have their own: pass --disable-hybrid-kv-cache-manager")
        self.engine = engine
        self.pool = pool
        self.block_size = spec.block_size
        self.dtype = spec.model_dtype
        self.block_shape = (spec.num_layers, 2, spec.block_size, spec.num_kv_heads, spec.head_dim)
        self.block_nbytes = math.prod(self.block_shape) * spec.model_dtype.itemsize

    def export_blocks(self, request_id: str, token_ids: list[int], salt: str | None) -> TransferRecord:
        """Put the prompt's full blocks that this engine holds and the pool lacks into the pool."""
        start = time.perf_counter()
        keys = block_keys(token_ids, self.block_size, salt)
        blocks = self.engine.kv_cache_manager.cached_prefix_blocks(token_ids, salt, len(keys))
        first = self.pool.lookup(keys[:len(blocks)])
        if first == len(blocks):
            return TransferRecord(request_id, "export", 0, 0, time.perf_counter() - start)
        kv = self.engine.runner.read_kv_blocks(blocks[first:])  # [n, layers, 2, block_size, KVH, D]
        rows = kv.reshape(len(blocks) - first, -1).view(torch.uint8).numpy()  # [n, block_nbytes]
        self.pool.put(keys[first:len(blocks)], rows)
        return TransferRecord(request_id, "export", rows.shape[0], rows.nbytes, time.perf_counter() - start)

    def import_blocks(self, request_id: str, token_ids: list[int], salt: str | None) -> TransferRecord:
        """Fetch the prompt's blocks this engine lacks from the pool (a leading run, at most the blocks a
        prefix hit may cover) and install them as cached prefix blocks. Lost or unreachable bytes are
        misses: the engine computes those tokens itself."""
        start = time.perf_counter()
        manager = self.engine.kv_cache_manager
        num_usable = (len(token_ids) - 1) // self.block_size  # a hit always leaves one token to compute
        num_local = len(manager.cached_prefix_blocks(token_ids, salt, num_usable))
        keys = block_keys(token_ids, self.block_size, salt, max_blocks=num_usable)[num_local:]
        segments = self._fetch(keys) if keys else []
        room = max(0, manager.num_free_blocks - num_local)  # held local blocks do not count as free
        segments = _take_rows(segments, room)
        num_rows = sum(len(s) for s in segments)
        new_blocks = manager.insert_cached_blocks(token_ids, num_local + num_rows, salt)
        offset = 0
        with warnings.catch_warnings():  # Ray's arrays are read-only; they are only copied from
            warnings.simplefilter("ignore", UserWarning)
            for segment in segments:
                kv = torch.from_numpy(segment).view(self.dtype).view(len(segment), *self.block_shape)
                self.engine.runner.write_kv_blocks(new_blocks[offset:offset + len(segment)], kv)
                offset += len(segment)
        return TransferRecord(request_id, "import", num_rows, num_rows * self.block_nbytes,
                              time.perf_counter() - start)

    def _fetch(self, keys: list[bytes]) -> list[np.ndarray]:
        try:
            segments = self.pool.get(keys)
        except Exception as exc:  # the owner of the bytes died, or the pool did: a miss
            logger.warning("KV pool fetch failed (%s); computing those blocks instead", exc)
            try:
                self.pool.drop(keys)
            except Exception:
                pass
            return []
        for segment in segments:
            if segment.shape[1] != self.block_nbytes:
                raise ValueError(f"KV pool blocks of {segment.shape[1]} bytes, this engine's take {self.block_nbytes}")
        return segments


def _take_rows(segments: list[np.ndarray], limit: int) -> list[np.ndarray]:
    """The first `limit` rows of the segments."""
    kept = []
    for segment in segments:
        if limit <= 0:
            break
        kept.append(segment[:limit])
        limit -= len(kept[-1])
    return kept


class PDWorker(EngineWorker):
    """An engine worker that also prefills into the KV pool and admits requests with blocks from it.

    Calls run one at a time, so a transfer and the engine's steps never interleave: blocks installed by
    `admit` are written before the step that may read them.
    """

    def __init__(self, build, config, pool) -> None:
        super().__init__(build, config)
        self.transfer = KVTransfer(self.engine, pool)
        self._prefilling: dict[str, tuple[list[int], str | None]] = {}
        self._transfers: list[TransferRecord] = []
        self._failed: dict[str, str] = {}

    def prefill(self, request_id: str, token_ids: list[int], cache_salt: str | None = None) -> None:
        """Queue the prompt's prefill (the pool's blocks first); its KV goes into the pool when done and
        the next `step` lists the request as prefilled. Errors come back in a step's `failed`."""
        try:
            self._transfers.append(self.transfer.import_blocks(request_id, token_ids, cache_salt))
            self.engine.add_request(request_id, list(token_ids), PREFILL_PARAMS, cache_salt=cache_salt)
        except Exception as exc:
            self._failed[request_id] = f"{type(exc).__name__}: {exc}"
            return
        self._prefilling[request_id] = (list(token_ids), cache_salt)

    def admit(self, request_id: str, prompt: str | list[int], params: SamplingParams, token_ids: list[int],
              cache_salt: str | None = None, arrival_time: float | None = None, raise_errors: bool = False) -> None:
        """Fetch the blocks of `token_ids` (the tokenized prompt) this engine lacks, then add the request.

        Raises:
            ValueError: with `raise_errors`, whatever `LLMEngine.add_request` raises; otherwise errors come
                back in a step's `failed`.
        """
        try:
            self._transfers.append(self.transfer.import_blocks(request_id, token_ids, cache_salt))
            self.engine.add_request(request_id, prompt, params, arrival_time=arrival_time, cache_salt=cache_salt)
        except Exception as exc:
            if raise_errors:
                raise
            self._failed[request_id] = f"{type(exc).__name__}: {exc}"

    def check_request(self, prompt: str | list[int], params: SamplingParams, cache_salt: str | None = None) -> None:
        """Raise what `LLMEngine.add_request` would raise for this request, keeping nothing."""
        request_id = f"check-{uuid.uuid4().hex}"
        self.engine.add_request(request_id, prompt, params, cache_salt=cache_salt)
        self.engine.abort_request([request_id])

    def abort_request(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._prefilling.pop(request_id, None)
        super().abort_request(request_ids)

    def step(self) -> PDStepResult:
        """One engine step; finished prefills are exported to the pool and listed, not returned."""
        result = super().step()
        outputs, prefilled = [], []
        for output in result.outputs:
            if output.request_id not in self._prefilling:
                outputs.append(output)
            elif output.finished:
                token_ids, salt = self._prefilling.pop(output.request_id)
                if output.extra.get("error"):
                    self._failed[output.request_id] = output.extra["error"]
                    continue
                self._export(output.request_id, token_ids, salt)
                prefilled.append(output.request_id)
        transfers, failed = self._transfers, self._failed
        self._transfers, self._failed = [], {}
        return PDStepResult(outputs, result.stats, prefilled, transfers, failed)

    def _export(self, request_id: str, token_ids: list[int], salt: str | None) -> None:
        try:
            self._transfers.append(self.transfer.export_blocks(request_id, token_ids, salt))
        except Exception as exc:  # a full object store or a dead pool: the decode worker computes instead
            logger.warning("KV export of request %s failed: %s", request_id, exc)

    def reset_prefix_cache(self) -> bool:
        """Drop this engine's cached blocks (refused while any is in use); the pool keeps its own."""
        return self.engine.kv_cache_manager.reset_prefix_cache()

    def has_cached_prefix(self, token_ids: list[int], cache_salt: str | None = None) -> int:
        """How many leading full blocks of `token_ids` this engine's prefix cache holds."""
        return len(self.engine.kv_cache_manager.cached_prefix_blocks(token_ids, cache_salt))
