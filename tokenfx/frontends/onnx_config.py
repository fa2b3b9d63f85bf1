"""What an imported ONNX model says about itself: the config a decoder needs to generate.

A captured Hugging Face model brings its ``config``; an ONNX file has none, yet the
``kv_cache`` pass needs the number of positions to precompute position tables for, and the
``Generator`` needs the vocabulary and the stop / pad tokens. They are read, later sources
overriding earlier ones, from:

1. the graph itself: ``vocab_size`` = the rows of the token-embedding table (the ``Gather``
   that reads the integer ``[batch, tokens]`` input from a 2-d float initializer);
2. ``config.json`` / ``generation_config.json`` beside the file — the layout of an optimum
   export or of an HF directory holding ``model.onnx`` (the generation config's token ids win,
   as in HF ``generate``);
3. the file's own metadata: ``metadata_props["tokenfx.config"]``, a JSON object with the same
   keys (:func:`config_metadata` writes it; ``tokenfx.export_onnx`` stores it).

The embedding table's row count is kept over a sidecar's ``vocab_size``: it is the width the
graph's logits have. Nothing is guessed: a RoPE model whose files do not state its positions
has ``max_position_embeddings = None``, and ``kv_cache`` then asks for ``max_positions=N``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

METADATA_KEY = "tokenfx.config"
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len")


@dataclasses.dataclass(frozen=True)
class ImportedConfig:
    """The decoding-relevant part of an HF config, for a graph imported from ONNX (read with
    ``getattr`` as an HF config is: ``vocab_size``, ``max_position_embeddings``, token ids)."""

    vocab_size: int | None = None
    max_position_embeddings: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    sliding_window: int | None = None
    sources: tuple[str, ...] = ()  # where the values came from ("graph", "config.json", "metadata")

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k != "sources"}


def config_metadata(config) -> str | None:
    """``config`` (an HF config or an :class:`ImportedConfig`) as the JSON stored under
    ``metadata_props["tokenfx.config"]`` (None when it says nothing decoding needs)."""
    if config is None:
        return None
    values = _known(lambda key: getattr(config, key, None))
    return json.dumps(values, sort_keys=True) if values else None


def imported_config(proto, path: Path | None) -> ImportedConfig | None:
    """The :class:`ImportedConfig` of ``proto`` (read from ``path``; None when nothing is known)."""
    values: dict = {}
    sources = []
    vocab = _embedding_rows(proto)
    if vocab is not None:
        values["vocab_size"], sources = vocab, ["graph"]
    if path is not None:
        for name in ("config.json", "generation_config.json"):
            found = _read_json(path.parent / name)
            if found:
                values.update(_known(found.get), vocab_size=values.get("vocab_size") or found.get("vocab_size"))
                sources.append(name)
    stored = next((p.value for p in proto.metadata_props if p.key == METADATA_KEY), None)
    if stored is not None:
        try:
            data = json.loads(stored)
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict):
            values.update(_known(data.get), vocab_size=values.get("vocab_size") or data.get("vocab_size"))
            sources.append("metadata")
    values = {k: v for k, v in values.items() if v is not None}
    return ImportedConfig(**values, sources=tuple(sources)) if values else None


def _known(get) -> dict:
    """The ImportedConfig fields ``get(key)`` has, positions under any of the HF names."""
    out = {}
    for field in dataclasses.fields(ImportedConfig):
        if field.name == "sources":
            continue
        keys = _POSITION_KEYS if field.name == "max_position_embeddings" else (field.name,)
        value = next((get(k) for k in keys if _valid(get(k))), None)
        if value is not None:
            out[field.name] = value
    return out


def _valid(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 0
    return isinstance(value, list) and bool(value) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _read_json(file: Path) -> dict | None:
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _embedding_rows(proto) -> int | None:
    """Rows of the table a ``Gather`` reads with the integer ``[batch, tokens]`` graph input."""
    from onnx import TensorProto

    integer = {TensorProto.INT64, TensorProto.INT32}
    initializers = {t.name: t for t in proto.graph.initializer}
    ids = {i.name for i in proto.graph.input if i.name not in initializers
           and i.type.tensor_type.elem_type in integer and len(i.type.tensor_type.shape.dim) == 2}
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
    for node in proto.graph.node:
        if node.op_type != "Gather" or len(node.input) < 2 or node.input[1] not in ids:
            continue
        table = initializers.get(node.input[0])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if table is not None and len(table.dims) == 2 and table.data_type in floats and axis == 0:
            return int(table.dims[0])
    return None
