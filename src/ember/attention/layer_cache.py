"""One layer's KV-cache tensors in the paged layout: in the model dtype, or as int8 codes with per-token
or per-channel scales and an optional side pool of 4-bit residuals for outlier tokens.

Every cache writes the step's new K/V at their slots (quantizing on write), reads a sequence's blocks
back as floats (prefill over cached blocks, the reference decode path) and runs decode attention
straight over its blocks with the native kernel when one is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.attention.kv_quant import dequantize, quantize_per_channel, quantize_per_token
from ember.attention.residuals import RESIDUAL_POOL_FRACTION, ResidualPool
from ember.attention.metadata import AttentionMetadata
from ember.config import check_kv_cache_options
from ember.kernels.ops import core_ops, native_has, quant_ops
from ember.kv_cache.groups import KVCacheGroup, buffer_of_layers, kv_cache_groups



@dataclass(frozen=True)
class KVCacheSpec:
    """How the KV cache stores a token: dtype, geometry and outlier residuals.

    `cache_dtype` follows vLLM's `--kv-cache-dtype`: "auto" keeps the model dtype; "int8" ("C8-D")
    quantizes each token and KV head with its own scale when written; "int8-static" ("C8-S") uses
    per-channel scales calibrated offline. `outlier_residual` (int8-static only) gives a token whose
    relative error exceeds `outlier_factor` x the running mean a 4-bit residual.

    `groups` (`kv_cache.groups`): the layers sharing a block table; with more than one, a block id holds one
    group's rows at a time and costs one group's layers of memory. Empty: one table for every layer.
    """

    cache_dtype: str
    model_dtype: torch.dtype
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    outlier_residual: bool = False
    outlier_factor: float = 3.0
    groups: tuple[KVCacheGroup, ...] = ()

    def __post_init__(self) -> None:
        check_kv_cache_options(self.cache_dtype, self.outlier_residual, self.outlier_factor)
        if self.outlier_residual and self.head_dim % 2:
            raise ValueError(f"4-bit residuals need an even head_dim, got {self.head_dim}")

    @classmethod
    def for_model(cls, model_config, model_dtype: torch.dtype, cache_dtype: str = "auto", block_size: int = 16,
                  outlier_residual: bool = False, outlier_factor: float = 3.0,
                  grouped: bool = False) -> "KVCacheSpec":
        """The spec of a model's cache: layers and KV geometry from its `ModelConfig`; with `grouped`, its
        layers split into KV-cache groups (local layers apart from global ones) for a manager that keeps a
        table per group; otherwise one table serves every layer."""
        num_layers = model_config.num_hidden_layers
        groups = kv_cache_groups(num_layers, model_config.layer_types, model_config.sliding_window) if grouped else ()
        return cls(cache_dtype, model_dtype, num_layers, model_config.num_key_value_heads,
                   model_config.head_dim, block_size, outlier_residual, outlier_factor, groups if len(groups) > 1 else ())

    @property
    def num_buffers(self) -> int:
        """Layers of K/V rows behind one block id: every layer, or one group's width."""
        return len(self.groups[0].layers) if self.groups else self.num_layers

    @property
    def windows(self) -> tuple[int | None, ...]:
        """Each group's window (None: global); one global table when the layers are not grouped."""
        return tuple(group.window for group in self.groups) or (None,)

    @property
    def is_quantized(self) -> bool:
        return self.cache_dtype != "auto"

    def bytes_per_token(self) -> float:
        """Cache bytes one slot of a block id takes over its layers (every layer, or one group's), K and V,
        scales and reserved residual rows included (static per-channel scales are per layer, not per token,
        and left out)."""
        width = self.num_kv_heads * self.head_dim
        if self.cache_dtype == "auto":
            row = width * self.model_dtype.itemsize
        else:
            row = width + (4 * self.num_kv_heads if self.cache_dtype == "int8" else 0)
        if self.outlier_residual:  # slot index + the reserved share of residual rows
            row += 4 + RESIDUAL_POOL_FRACTION * (width // 2 + 4 * self.num_kv_heads)
        return 2 * self.num_buffers * row

    def bytes_per_block(self) -> int:
        return int(-(-self.bytes_per_token() * self.block_size // 1))


class DenseLayerCache:
    """K and V blocks in the model dtype: [num_blocks, block_size, KVH, D] each."""

    is_quantized = False

    def __init__(self, num_blocks: int, spec: KVCacheSpec, group: int = 0,
                 shares: "DenseLayerCache | None" = None) -> None:
        """`group`: the KV-cache group whose block table this layer reads; `shares`: a layer of another group
        whose tensors this one stores its rows in (a block id is held by one group at a time)."""
        shape = (num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        self.block_size = spec.block_size
        self.group = group
        self.key = shares.key if shares else torch.zeros(shape, dtype=spec.model_dtype)
        self.value = shares.value if shares else torch.zeros(shape, dtype=spec.model_dtype)

    def write(self, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store the step's new keys/values k, v [T, KVH, D] at their slots."""
        kvh, dim = k.shape[1], k.shape[2]
        self.key.view(-1, kvh, dim).index_copy_(0, slot_mapping, k)
        self.value.view(-1, kvh, dim).index_copy_(0, slot_mapping, v)

    def read(self, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the blocks in `block_tables` [..., n]: [..., n * block_size, KVH, D]."""
        return self.key[block_tables].flatten(-4, -3), self.value[block_tables].flatten(-4, -3)

    def move(self, src: torch.Tensor, dst: torch.Tensor, dropped: torch.Tensor) -> None:
        """Copy the K/V at slots `src` to slots `dst` (eviction's compaction); `dropped` slots are let go."""
        for tensor in (self.key, self.value):
            flat = tensor.view(-1, *tensor.shape[2:])
            flat[dst] = flat[src]  # the right side is gathered first: overlapping moves are safe

    def decode(self, q: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor | None:
        """Native decode attention of q [N, H, D] over the decode rows' blocks, or None without a build."""
        ops = core_ops()
        if ops is None:
            return None
        return ops.paged_decode_attention(q, self.key, self.value, meta.decode_block_tables,
                                          meta.decode_seq_lens, scale)

    def prefill(self, q: torch.Tensor, block_table: torch.Tensor, context_len: int, scale: float) -> torch.Tensor | None:
        """Native causal attention of one prompt chunk, q [n, H, D] at rows context_len.., over its sequence's
        blocks; None without the AVX512-BF16 build, or for a dtype or head size the kernel does not take."""
        if self.key.dtype != torch.bfloat16 or not native_prefill_takes(q):
            return None
        return core_ops().paged_prefill_attention(q, self.key, self.value, block_table, context_len, scale)


def native_prefill_takes(q: torch.Tensor) -> bool:
    """Whether the native prefill kernel runs queries like q [n, H, D] here (bfloat16, head_dim a multiple of 16
    up to 256, an AVX512-BF16 build)."""
    dim = q.shape[-1]
    return q.dtype == torch.bfloat16 and dim % 16 == 0 and dim <= 256 and native_has("core", "avx512_bf16")


class QuantizedRows:
    """K or V of one layer as int8 codes [num_blocks, block_size, KVH, D] with per-token scales
    [num_blocks, block_size, KVH] or fixed per-channel scales [KVH, D], and optional residuals."""

    def __init__(self, num_blocks: int, spec: KVCacheSpec, static_scales: torch.Tensor | None,
                 shares: "QuantizedRows | None" = None) -> None:
        """`shares`: rows of another group's layer whose slot storage (codes, per-token scales, residual pool)
        these use too; per-channel scales stay the layer's own."""
        shape = (num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        self.codes = shares.codes if shares else torch.zeros(shape, dtype=torch.int8)
        self.per_token = static_scales is None
        if self.per_token:
            self.scales = shares.scales if shares else torch.zeros(shape[:3], dtype=torch.float32)
        else:
            if tuple(static_scales.shape) != shape[2:]:
                raise ValueError(f"static KV scales must be [{shape[2]}, {shape[3]}], got {tuple(static_scales.shape)}")
            self.scales = static_scales.float().contiguous()
        # A slot's residual row is released when the slot is written again, by whichever group holds it then.
        self.residuals = shares.residuals if shares else (
            ResidualPool(num_blocks * spec.block_size, spec.num_kv_heads, spec.head_dim, spec.outlier_factor)
            if spec.outlier_residual else None)
        self.kernel_args = self._make_kernel_args()
        ops = quant_ops()  # per-token codes without residuals: one native call per write
        native = ops is not None and self.per_token and self.residuals is None
        self.native_write = ops.write_rows_int8 if native else None

    def write(self, x: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        kvh, dim = x.shape[1], x.shape[2]
        if self.native_write is not None and x.dtype in (torch.float32, torch.bfloat16):
            self.native_write(x, slot_mapping, self.codes, self.scales)  # quantize_per_token's rounding
            return
        if self.per_token:
            codes, scales = quantize_per_token(x)
            self.scales.view(-1, kvh).index_copy_(0, slot_mapping, scales)
        else:
            codes = quantize_per_channel(x, self.scales)
        self.codes.view(-1, kvh, dim).index_copy_(0, slot_mapping, codes)
        if self.residuals is not None:
            self.residuals.record(x, dequantize(codes, self.scales, per_token=False), slot_mapping)

    def move(self, src: torch.Tensor, dst: torch.Tensor, dropped: torch.Tensor) -> None:
        kvh, dim = self.codes.shape[2], self.codes.shape[3]
        codes = self.codes.view(-1, kvh, dim)
        codes[dst] = codes[src]
        if self.per_token:
            scales = self.scales.view(-1, kvh)
            scales[dst] = scales[src]
        if self.residuals is not None:
            self.residuals.move(src, dst, dropped)

    def read(self, block_tables: torch.Tensor) -> torch.Tensor:
        """Dequantized rows of `block_tables` [..., n]: [..., n * block_size, KVH, D] float32."""
        codes = self.codes[block_tables].flatten(-4, -3)
        scales = self.scales[block_tables].flatten(-3, -2) if self.per_token else self.scales
        values = dequantize(codes, scales, self.per_token)
        if self.residuals is None:
            return values
        block_size = self.codes.shape[1]
        slots = (block_tables[..., None] * block_size + torch.arange(block_size)).flatten(-2)  # [..., n * bs]
        return self.residuals.add_to(values, slots)

    def _make_kernel_args(self) -> tuple[torch.Tensor, ...]:
        """codes, scales, residual index, residual codes, residual scales (empty: no residuals). Every
        tensor is allocated once and updated in place, so the tuple is built once."""
        pool = self.residuals
        if pool is None:
            empty = torch.empty(0)
            return self.codes, self.scales, empty.int(), empty.to(torch.uint8), empty
        return self.codes, self.scales, pool.index, pool.codes, pool.scales


class Int8LayerCache:
    """K and V as `QuantizedRows`; reads come back in the model dtype."""

    is_quantized = True

    def __init__(self, num_blocks: int, spec: KVCacheSpec,
                 static_scales: tuple[torch.Tensor, torch.Tensor] | None = None, group: int = 0,
                 shares: "Int8LayerCache | None" = None) -> None:
        """`group` and `shares` as `DenseLayerCache`'s."""
        if (spec.cache_dtype == "int8-static") != (static_scales is not None):
            raise ValueError("int8-static needs calibrated per-channel scales; int8 takes none")
        self.dtype = spec.model_dtype
        self.block_size = spec.block_size
        self.group = group
        self.key = QuantizedRows(num_blocks, spec, static_scales[0] if static_scales else None,
                                 shares.key if shares else None)
        self.value = QuantizedRows(num_blocks, spec, static_scales[1] if static_scales else None,
                                   shares.value if shares else None)

    def write(self, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        self.key.write(k, slot_mapping)
        self.value.write(v, slot_mapping)

    def read(self, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.key.read(block_tables).to(self.dtype), self.value.read(block_tables).to(self.dtype)

    def move(self, src: torch.Tensor, dst: torch.Tensor, dropped: torch.Tensor) -> None:
        self.key.move(src, dst, dropped)
        self.value.move(src, dst, dropped)

    def prefill(self, q: torch.Tensor, block_table: torch.Tensor, context_len: int, scale: float) -> torch.Tensor | None:
        """As `DenseLayerCache.prefill`, over the codes (each row dequantized to bfloat16 as `read` gives it);
        None also with outlier residuals."""
        if self.key.residuals is not None or self.dtype != torch.bfloat16 or not native_prefill_takes(q):
            return None
        return core_ops().paged_prefill_attention_int8(q, self.key.codes, self.key.scales, self.value.codes,
                                                       self.value.scales, block_table, context_len, scale)

    def decode(self, q: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor | None:
        ops = core_ops()
        if ops is None:
            return None
        return ops.paged_decode_attention_int8(q, *self.key.kernel_args, *self.value.kernel_args,
                                               meta.decode_block_tables, meta.decode_seq_lens, scale)


LayerCache = DenseLayerCache | Int8LayerCache


def create_layer_caches(spec: KVCacheSpec, num_blocks: int,
                        static_scales: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> list[LayerCache]:
    """One cache per layer, in layer order; with KV-cache groups, layer j of each group stores its rows in the
    tensors of layer j of the first group. `static_scales`: per layer (k_scale, v_scale), each [KVH, D], for
    int8-static."""
    if spec.cache_dtype == "int8-static" and (static_scales is None or len(static_scales) != spec.num_layers):
        raise ValueError(f"int8-static needs calibrated KV scales for each of the {spec.num_layers} layers "
                         "(`ember calibrate-kv --output DIR`, then --kv-scales DIR)")
    place = buffer_of_layers(spec.groups) if spec.groups else {layer: (0, layer) for layer in range(spec.num_layers)}
    buffers: dict[int, LayerCache] = {}
    caches = []
    for layer in range(spec.num_layers):
        group, buffer = place[layer]
        shares = buffers.get(buffer)
        if spec.cache_dtype == "auto":
            cache = DenseLayerCache(num_blocks, spec, group, shares)
        else:
            scales = static_scales[layer] if spec.cache_dtype == "int8-static" else None
            cache = Int8LayerCache(num_blocks, spec, scales, group, shares)
        buffers.setdefault(buffer, cache)
        caches.append(cache)
    return caches


def cache_statistics(spec: KVCacheSpec, caches: list[LayerCache]) -> dict:
    """What the cache costs per token, and (with residuals) how many written tokens were outliers
    and the bytes their residual rows take, over every layer's K and V."""
    stats = {"kv_cache_dtype": spec.cache_dtype, "bytes_per_token": spec.bytes_per_token()}
    pools = [rows.residuals for cache in caches if isinstance(cache, Int8LayerCache)
             for rows in (cache.key, cache.value) if rows.residuals is not None]
    if pools:
        written = sum(pool.num_tokens for pool in pools)
        outliers = sum(pool.num_outliers for pool in pools)
        # Residual bytes per written token: each outlier's row (codes + scales) and its slot index.
        residual_bytes = sum(pool.num_outliers * pool.row_bytes for pool in pools) / max(written, 1) * len(pools)
        stats.update({"outlier_share": outliers / max(written, 1),
                      "outliers_dropped": sum(pool.num_dropped for pool in pools),
                      "residual_bytes_per_token": residual_bytes,
                      "bytes_per_token_used": spec.bytes_per_token() - len(pools) * RESIDUAL_POOL_FRACTION * pools[0].row_bytes
                      + residual_bytes})
    return stats
