"""``tokenfx.load(spec)``: every way a user names a model, to a captured :class:`ModelGraph`.

Accepted specs:

- ``tokenfx:<name>`` — a bundled model (:mod:`tokenfx.assets`);
- a Hugging Face model directory (``config.json`` + ``model.safetensors``);
- a ``.gguf`` file (llama.cpp's format; dequantized once into an HF directory in the tokenfx cache);
- a ``.pt2`` file written by ``torch.export.save`` (or ``tokenfx rewrite -o x.pt2``);
- an ``.onnx`` file (:mod:`tokenfx.frontends.onnx_import`: the same ATen graph, module paths from node scopes);
- ``package.module:factory`` — ``factory()`` returns an ``nn.Module`` (Hugging Face) or a
  ``(module, example_inputs)`` pair.

It is also the one place a spec is parsed for generation: :func:`load_decoder` (the decoder
a ``Generator`` runs, as a module when there is one), :func:`decoder_graph` (its capture),
:func:`model_dir`, :func:`load_tokenizer` and :func:`tokenizer_vocab` (the files stored with it).

Masked-diffusion LMs (LLaDA-style dLLMs) are recognised by two config keys, ``"is_causal":
false`` and ``"mask_token_id"`` (:func:`diffusion_config`); they load bidirectional, whatever
their family (every module with an ``is_causal`` flag has it turned off, and transformers'
mask builder gives an all-visible mask for such a config), and :func:`decoder_graph` refuses
them for left-to-right decoding.

Hugging Face models are captured with synthetic example inputs (batch 2, 64 tokens, or
images at the config's size); the graph stays dynamic in batch and tokens.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

from tokenfx.errors import DiffusionError, ModelLoadError
from tokenfx.ir.graph import ModelGraph
from tokenfx.ir.rewrite import remove_identity_ops


def load(spec, example_inputs=None) -> ModelGraph:
    from tokenfx.frontends.torch_export import capture

    if isinstance(spec, ModelGraph):
        return spec
    if isinstance(spec, torch.nn.Module):
        return capture(spec, example_inputs if example_inputs is not None else example_inputs_for(spec))
    spec = str(spec)
    if spec.startswith("tokenfx:"):
        from tokenfx import assets

        return load(assets.path(spec.split(":", 1)[1]), example_inputs)
    path = Path(spec)
    if path.suffix == ".gguf":
        from tokenfx.frontends.gguf import hf_directory

        return load(hf_directory(path), example_inputs)
    if path.suffix == ".pt2":
        return load_pt2(path)
    if path.suffix == ".onnx":
        from tokenfx.frontends.onnx_import import import_onnx

        return import_onnx(path)
    if path.is_dir():
        model = load_hf_model(path)
        return capture(model, example_inputs if example_inputs is not None else example_inputs_for(model))
    if ":" in spec and not path.exists() and not spec.startswith(("/", ".")):
        module, factory_inputs = load_factory(spec)
        if isinstance(module, ModelGraph):
            return module
        if example_inputs is None:
            example_inputs = factory_inputs if factory_inputs is not None else example_inputs_for(module)
        return capture(module, example_inputs)
    if not path.exists():
        raise ModelLoadError(f"no such model file or directory: {spec}")
    raise ModelLoadError(f"{spec}: not a model (expected a Hugging Face directory, a .pt2 file, "
                         "tokenfx:<name> or package.module:factory)")


def load_hf_model(directory: Path, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The Hugging Face model in ``directory``, in eval mode, with its own architecture class."""
    config_file = directory / "config.json"
    if not config_file.exists():
        raise ModelLoadError(f"{directory} is not a Hugging Face model directory: config.json is missing")
    try:
        config_data = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{config_file} is not valid JSON: {exc}") from exc
    weights = list(directory.glob("*.safetensors")) + list(directory.glob("pytorch_model*.bin"))
    if not weights:
        raise ModelLoadError(f"{directory} has no weights (model.safetensors)")
    try:
        import transformers
    except ImportError as exc:
        raise ModelLoadError("loading a Hugging Face directory needs transformers: pip install 'tokenfx[hf]'") from exc
    architectures = config_data.get("architectures") or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    cls = cls or transformers.AutoModel
    transformers.utils.logging.disable_progress_bar()
    try:
        model = cls.from_pretrained(str(directory), **({"dtype": dtype} if dtype is not None else {}))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load the model in {directory}: {first}") from exc
    if config_data.get("is_causal", True) is False:
        make_bidirectional(model)
    return model.eval()


def make_bidirectional(model: torch.nn.Module) -> torch.nn.Module:
    """Turn off ``is_causal`` on every module that has it (family-free: Hugging Face attention
    modules pass it to SDPA when no mask is given). In place; returns ``model``."""
    for module in model.modules():
        if isinstance(getattr(module, "is_causal", None), bool):
            module.is_causal = False
    return model


def example_inputs_for(model: torch.nn.Module, batch: int = 2, tokens: int = 64) -> dict:
    """Synthetic inputs for a Hugging Face model: token ids + mask, or images. The token count
    is long enough for token-reduction schedules (shapes are re-derived at the example)."""
    config = getattr(model, "config", None)
    if config is None:
        raise ModelLoadError(f"{type(model).__name__} is not a Hugging Face model: give example inputs "
                             "(or return (module, example_inputs) from the factory)")
    generator = torch.Generator().manual_seed(0)
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        size = getattr(config, "image_size", 224)
        channels = getattr(config, "num_channels", 3)
        return {"pixel_values": torch.randn(batch, channels, size, size, generator=generator)}
    from tokenfx.ir.graph import max_tokens

    tokens = min(tokens, max_tokens(config) or tokens)
    vocab = getattr(config, "vocab_size", 100)
    ids = torch.randint(0, vocab, (batch, tokens), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def load_pt2(path: Path) -> ModelGraph:
    if not path.exists():
        raise ModelLoadError(f"no such model file: {path}")
    try:
        ep = torch.export.load(str(path))
    except Exception as exc:
        raise ModelLoadError(f"{path} is not a valid .pt2 file: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from exc
    args, kwargs, dynamic = _examples_from_program(ep)
    gm = ep.module()
    remove_identity_ops(gm)  # as capture does: a saved program's dtype asserts would hide patterns (the final norm's end)
    return ModelGraph(gm, args, kwargs, dynamic, family=str(ep.graph_module.meta.get("family", "pt2")), source="export")


def _examples_from_program(ep) -> tuple[tuple, dict, object]:
    """Example tensors and a dynamic_shapes spec rebuilt from a program's input signature."""
    from torch.export.graph_signature import InputKind

    user_inputs = [s for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    dims: dict = {}
    ranges = ep.range_constraints
    values = []
    specs = []
    for spec in user_inputs:
        fake = placeholders[spec.arg.name].meta["val"]
        shape, dim_spec = [], {}
        for i, size in enumerate(fake.shape):
            if isinstance(size, torch.SymInt):
                expr = size.node.expr
                vr = ranges.get(expr)
                lo = max(int(vr.lower), 2) if vr is not None else 2  # export specialises sizes 0 and 1
                hi = int(vr.upper) if vr is not None and vr.upper.is_finite else None
                if str(expr) not in dims:
                    dims[str(expr)] = torch.export.Dim(f"d{expr}", min=1, max=hi) if hi else torch.export.Dim(f"d{expr}")
                dim_spec[i] = dims[str(expr)]
                shape.append(lo)
            else:
                shape.append(int(size))
        if fake.is_floating_point():
            values.append(torch.randn(shape, dtype=fake.dtype))
        else:
            values.append(torch.zeros(shape, dtype=fake.dtype) if fake.dtype != torch.bool else torch.ones(shape, dtype=torch.bool))
        specs.append(dim_spec or None)
    names = list(ep.module_call_graph[0].signature.in_spec.children()[1].context) if ep.module_call_graph else []
    if names and len(names) == len(values) and ep.module_call_graph[0].signature.in_spec.children()[0].num_children == 0:
        return (), dict(zip(names, values)), dict(zip(names, specs))
    return tuple(values), {}, tuple(specs)


def load_factory(spec: str):
    """``package.module:factory`` → (module, example_inputs or None)."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(f"cannot import {module_name!r} from model spec {spec!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ModelLoadError(f"{module_name!r} has no callable {attr!r} (model spec {spec!r})")
    try:
        result = factory()
    except Exception as exc:
        raise ModelLoadError(f"model factory {spec} raised {type(exc).__name__}: {exc}") from exc
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module):
        return result[0].eval(), result[1]
    if isinstance(result, (torch.nn.Module, ModelGraph)):
        return result, None
    raise ModelLoadError(f"{spec} returned {type(result).__name__}; expected an nn.Module or (module, example_inputs)")


# -- decoders and their tokenizers (generation) -----------------------------------------------------------
def model_dir(spec: str) -> Path | None:
    """The Hugging Face directory behind ``tokenfx:<name>``, an HF directory or a ``.gguf`` file
    (converted once into the tokenfx cache); None for other specs (``.pt2``, factories)."""
    if spec.startswith("tokenfx:"):
        from tokenfx import assets

        return Path(assets.path(spec.split(":", 1)[1]))  # unknown names: ModelLoadError listing the bundled ones
    path = Path(spec)
    if path.suffix == ".gguf":
        from tokenfx.frontends.gguf import hf_directory

        return hf_directory(path)
    return path if path.is_dir() else None


def load_decoder(spec) -> torch.nn.Module | ModelGraph:
    """The decoder ``spec`` names, as generation runs it: the Hugging Face module (float32, so
    the graphs are built from the model itself, not from a capture at fixed example inputs) when
    the spec is a directory, a bundled name or a ``.gguf`` file; else the graph :func:`load`
    returns (``.pt2``, ``.onnx`` — its config, for the vocabulary, positions and stop tokens, from
    :mod:`tokenfx.frontends.onnx_config` — or ``package.module:factory``)."""
    directory = model_dir(str(spec))
    if directory is not None:
        return load_hf_model(directory, dtype=torch.float32)
    return load(str(spec))


def decoder_graph(model: torch.nn.Module | ModelGraph, *, diffusion: bool = False) -> ModelGraph:
    """A full-sequence ModelGraph of an already loaded decoder (:func:`load_decoder`), captured
    with token ids only (batch 2, 8 tokens; dynamic in both). A ModelGraph is returned as it is.
    A masked-diffusion LM is refused unless ``diffusion`` (it does not decode left to right);
    with ``diffusion`` it is captured bidirectional."""
    from tokenfx.frontends.torch_export import capture

    if isinstance(model, ModelGraph):
        return model
    mask_id = diffusion_config(model)
    if mask_id is not None and not diffusion:
        raise DiffusionError(f"{type(model).__name__} is a masked-diffusion LM (config is_causal: false, mask_token_id "
                             f"{mask_id}): it is not decoded left to right; use tokenfx.diffuse(model, ids, "
                             "gen_length=N, block_length=K) or `tokenfx generate MODEL --diffusion vanilla`")
    if diffusion:
        make_bidirectional(model)
    config = getattr(model, "config", None)
    vocab = int(getattr(config, "vocab_size", 2) or 2)
    ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    device = next(model.parameters()).device
    return capture(model, (ids.to(device),))


def model_config(model) -> dict | None:
    """The config of ``model`` as a dict: a module's / graph's ``config``, or the ``config.json``
    stored with a spec (None when there is none)."""
    config = getattr(model, "config", None)
    if config is not None:
        return config if isinstance(config, dict) else config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    if isinstance(model, (str, Path)):
        directory = model_dir(str(model))
        if directory is not None and (directory / "config.json").exists():
            try:
                return json.loads((directory / "config.json").read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                return None
    return None


def diffusion_config(model) -> int | None:
    """The mask token id of a masked-diffusion LM (config ``is_causal: false`` and
    ``mask_token_id``), None for any other model (spec, module or graph)."""
    config = model_config(model)
    if config is None or config.get("is_causal", True) is not False or config.get("mask_token_id") is None:
        return None
    return int(config["mask_token_id"])


def tokenizer_vocab(spec: str | None) -> dict | None:
    """The token → id map of the ``tokenizer.json`` stored with ``spec`` (None when there is none)."""
    directory = model_dir(str(spec)) if spec is not None else None
    if directory is None or not (directory / "tokenizer.json").exists():
        return None
    vocab = json.loads((directory / "tokenizer.json").read_text()).get("model", {}).get("vocab")
    return vocab if isinstance(vocab, dict) else None


def load_tokenizer(spec: str):
    """The Hugging Face tokenizer stored with ``spec`` (left padding, for batched prompts)."""
    directory = model_dir(str(spec))
    if directory is None or not any((directory / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise ModelLoadError(f"{spec} has no tokenizer; give an HF directory with tokenizer files or tokenfx:<name>")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    tokenizer.padding_side = "left"
    return tokenizer
