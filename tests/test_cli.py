"""The tokenfx command: each subcommand's output contract, and bad input → one line, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tokenfx.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_json_contract(capsys):
    code, out, _ = run(capsys, "inspect", "factories:tiny_llama", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["family"] == "llama" and data["num_blocks"] == 2
    assert data["position"] == "rope" and data["token_axis"] == 1
    block = data["blocks"][0]
    assert block["name"] == "model.layers.0"
    assert (block["norm"], block["norm_placement"]) == ("rmsnorm", "pre")
    assert block["attention"] == {"heads": 4, "kv_heads": 2, "head_dim": 8, "causal": True, "core": "sdpa"}


def test_inspect_table(capsys):
    code, out, _ = run(capsys, "inspect", "factories:tiny_bert")
    assert code == 0
    assert "encoder.layer.1" in out and "post" in out and "layernorm" in out


def test_passes_lists_fuse_norm(capsys):
    code, out, _ = run(capsys, "passes", "--json")
    assert code == 0
    by_name = {p["name"]: p for p in json.loads(out)}
    assert by_name["fuse_norm"]["contract"] == "exact"
    assert by_name["fuse_norm"]["options"] == [{"name": "final_norm", "type": "bool", "default": True}]


def test_rewrite_onnx_with_verify_and_kernels(capsys, tmp_path):
    out_file = tmp_path / "llama.onnx"
    kernels = tmp_path / "kernels"
    code, out, _ = run(capsys, "rewrite", "factories:tiny_llama", "--passes", "fuse_norm", "-o", str(out_file),
                       "--verify", "--emit-kernels", str(kernels), "--json")
    assert code == 0
    summary = json.loads(out)
    (report,) = summary["passes"]
    assert report["name"] == "fuse_norm" and len(report["matched"]) == 4
    assert report["max_abs_error"] <= report["tolerance"]
    assert out_file.exists() and out_file.stat().st_size > 0
    files = sorted(p.name for p in kernels.iterdir())
    assert files == ["add_norm_rmsnorm_C32_float32_w_eps1e-06.py"]
    compile((kernels / files[0]).read_text(), files[0], "exec")  # standalone, valid Python


def test_rewrite_pt2(capsys, tmp_path):
    """The written file is a loadable ExportedProgram that computes what the original model does,
    with the fused op in it, at a batch and length other than the capture's."""
    import torch

    import models

    out_file = tmp_path / "bert.pt2"
    code, out, _ = run(capsys, "rewrite", "factories:tiny_bert", "--passes", "fuse_norm(final_norm=false)", "-o", str(out_file))
    assert code == 0 and out_file.exists()
    assert "fuse_norm" in out and "wrote" in out
    program = torch.export.load(out_file)
    fused = [n for n in program.graph.nodes if n.target is torch.ops.tokenfx.add_norm.default]
    assert len(fused) == 4  # two blocks × (attention, MLP) residual + norm
    ids = torch.randint(0, models.VOCAB, (3, 13), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # one padded row
    original = models.bert().eval()  # the same seeded weights the factory built
    with torch.no_grad():
        expected = original(input_ids=ids, attention_mask=mask).last_hidden_state
        got = program.module()(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["rewrite", "factories:tiny_bert", "--passes", "fuse_norm,,x"], "position 10"),
        (["rewrite", "factories:tiny_bert", "--passes", "fuse_nrom"], "valid passes: early_exit, fuse_norm, kv_cache, split_overlap, tensor_parallel, token_merge, token_prune, token_shuffle, tree_verify"),
        (["rewrite", "factories:tiny_bert", "--passes", "fuse_norm(bogus=1)"], "valid options: final_norm"),
        (["rewrite", "/no/such/model", "--passes", "fuse_norm"], "no such model file or directory"),
        (["rewrite", "factories:mlp_only", "--passes", "fuse_norm"], "no attention core found"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_file(capsys, tmp_path, argv, message):
    out_file = tmp_path / "out.onnx"
    code, _, err = run(capsys, *argv, "-o", str(out_file))
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_bad_output_suffix(capsys, tmp_path):
    code, _, err = run(capsys, "rewrite", "factories:tiny_bert", "--passes", "fuse_norm", "-o", str(tmp_path / "x.bin"))
    assert code == 2 and ".pt2 or .onnx" in err


def test_failed_export_leaves_nothing(capsys, tmp_path, monkeypatch):
    import torch

    def boom(*args, **kwargs):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(torch.onnx, "export", boom)
    code, _, err = run(capsys, "rewrite", "factories:tiny_bert", "--passes", "fuse_norm", "-o", str(tmp_path / "m.onnx"))
    assert code == 2 and "ONNX export failed: exporter exploded" in err
    assert list(tmp_path.iterdir()) == []


def test_debug_shows_the_traceback(tmp_path):
    from tokenfx.errors import ModelLoadError

    with pytest.raises(ModelLoadError):
        main(["--debug", "inspect", str(tmp_path / "missing")])


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tokenfx.cli", "inspect", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr


def test_emit_kernels_into_a_file_fails_before_writing(capsys, tmp_path):
    blocker = tmp_path / "kernels"
    blocker.write_text("a file, not a directory")
    code, _, err = run(capsys, "rewrite", "factories:tiny_bert", "--passes", "fuse_norm", "-o", str(tmp_path / "m.pt2"),
                       "--emit-kernels", str(blocker))
    assert code == 2 and "is not a directory" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kernels"]


# -- generate --------------------------------------------------------------------------------------
def test_generate_json_matches_the_library(capsys):
    code, out, _ = run(capsys, "generate", "tokenfx:tiny-code", "--prompt", "def parse(line):\n    ", "--max-new-tokens", "6",
                       "--json")
    assert code == 0
    data = json.loads(out)
    assert set(data) == {"text", "token_ids", "new_tokens", "seconds", "tokens_per_s"}
    assert data["new_tokens"] == len(data["token_ids"]) <= 6
    import tokenfx
    from tokenfx.frontends.load import load_tokenizer

    tok = load_tokenizer("tokenfx:tiny-code")
    ids = tok("def parse(line):\n    ", return_tensors="pt")["input_ids"]
    expected = tokenfx.generate("tokenfx:tiny-code", ids, max_new_tokens=6)[0, ids.shape[1]:].tolist()
    assert data["token_ids"] == expected
    assert data["text"] == tok.decode(expected, skip_special_tokens=True)


def test_generate_streams_the_prompt_and_continuation(capsys, tmp_path):
    prompt = tmp_path / "prompt.py"
    prompt.write_text("import os\n")
    code, out, err = run(capsys, "generate", "tokenfx:tiny-code", "--prompt-file", str(prompt), "--max-new-tokens", "5",
                         "--temperature", "0.8", "--top-p", "0.9", "--seed", "3")
    assert code == 0
    assert out.startswith("import os\n") and len(out) > len("import os\n")
    assert "tokens/s" in err


def test_generate_early_exit_is_marked_approximate(capsys):
    code, out, err = run(capsys, "generate", "tokenfx:tiny-code", "--prompt", "def parse(line):\n    ", "--max-new-tokens",
                         "6", "--early-exit", "0.0", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["approximate"] is True and data["mean_layers"] == 1.0  # threshold 0: every token exits at block 1
    assert data["early_exit"]["threshold"] == 0.0 and data["early_exit"]["measure"] == "softmax"
    code, out, err = run(capsys, "generate", "tokenfx:tiny-code", "--prompt", "x", "--max-new-tokens", "4",
                         "--skip-decode", "6")
    assert code == 0 and "APPROXIMATE early exit: 6.00 of 6 blocks per token" in " ".join(err.split())


@pytest.mark.parametrize("argv,message", [
    (["generate", "tokenfx:tiny-code", "--prompt", "x", "--early-exit", "1.5"], "threshold must be in [0, 1], got 1.5"),
    (["generate", "tokenfx:tiny-code", "--prompt", "x", "--early-exit", "0.5", "--speculate", "self:2"], "do not combine"),
    (["generate", "tokenfx:tiny-code", "--prompt", "x", "--exit-measure", "state"], "--exit-measure needs --early-exit"),
    (["generate", "tokenfx:tiny-code", "--prompt", "x", "--speculate", "self:9"], "exit layer must be in 1 … 5"),
    (["generate", "factories:tiny_llama", "--prompt", "x"], "has no tokenizer"),
    (["generate", "tokenfx:nope", "--prompt", "x"], "unknown bundled model"),
    (["generate", "tokenfx:tiny-code"], "exactly one of --prompt"),
    (["generate", "tokenfx:tiny-code", "--prompt", "x", "--max-new-tokens", "5000"], "exceeds the model's 2048 positions"),
])
def test_generate_bad_input_is_one_line_exit_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert message in err and "Traceback" not in err


def test_rewrite_kv_cache_from_a_model_captured_with_its_attention_mask(capsys, tmp_path):
    """tokenfx.load captures HF models with input_ids + attention_mask: kv_cache drops the mask
    input (its sizes come from the token ids) and the decode graph exports with --verify."""
    out_file = tmp_path / "decode.onnx"
    code, out, err = run(capsys, "rewrite", "factories:tiny_llama", "--passes", "kv_cache(mode=decode)", "-o", str(out_file),
                         "--verify", "--json")
    assert code == 0, err
    report = json.loads(out)["passes"][0]
    assert report["max_abs_error"] <= report["tolerance"]
    import onnx

    assert [i.name for i in onnx.load(out_file).graph.input] == ["tokens", "positions", "kv_cache", "cache_mask", "token_mask"]


def test_chat_needs_a_chat_template(capsys):
    code, _, err = run(capsys, "generate", "tokenfx:tiny-code", "--prompt", "hi", "--chat", "--max-new-tokens", "2")
    assert code == 2 and "has no chat template" in err and "Traceback" not in err


def test_chat_applies_the_template(capsys):
    code, out, _ = run(capsys, "generate", "tokenfx:smollm2", "--chat", "--prompt", "What is the capital of France?",
                       "--max-new-tokens", "10", "--no-compile", "--json")
    assert code == 0
    assert "Paris" in json.loads(out)["text"]


def test_generate_with_an_adapter_the_model_lacks_is_one_line_and_prints_nothing(capsys):
    code, out, err = run(capsys, "generate", "tokenfx:tiny-code", "--prompt", "def f(x):", "--max-new-tokens", "4",
                         "--no-compile", "--speculate", "self:adapter")
    assert code == 2 and out == ""
    assert "no exit adapter is trained for this model" in err and "Traceback" not in err


# -- generate --diffusion (masked-diffusion LMs) ----------------------------------------------------------
@pytest.fixture(scope="module")
def dllm_dir(tmp_path_factory):
    """A tiny random-init masked-diffusion LM directory: tiny-code's tokenizer plus ``<|mask|>``
    (id 4096), a one-block Llama with ``is_causal: false`` and ``mask_token_id`` in its config."""
    import torch
    import transformers

    from tokenfx import assets

    directory = tmp_path_factory.mktemp("dllm")
    tokenizer = transformers.AutoTokenizer.from_pretrained(assets.path("tiny-code"))
    tokenizer.add_special_tokens({"mask_token": "<|mask|>"})
    tokenizer.save_pretrained(directory)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=64, attn_implementation="sdpa")
    config.is_causal = False
    config.mask_token_id = tokenizer.mask_token_id
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return str(directory)


def test_generate_diffusion_json_matches_the_library(capsys, dllm_dir):
    code, out, err = run(capsys, "generate", dllm_dir, "--prompt", "def parse(line):", "--max-new-tokens", "8",
                         "--diffusion", "vanilla", "--no-cache", "--block-length", "4", "--no-compile", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert {"text", "token_ids", "new_tokens", "rounds", "seconds", "tokens_per_s"} <= set(data)
    assert data["new_tokens"] == len(data["token_ids"]) == 8 and data["rounds"] == 8  # one token per round
    assert (data["cache"], data["approximate"]) == ("none", False)
    import tokenfx
    from tokenfx.frontends.load import load_tokenizer

    ids = load_tokenizer(dllm_dir)("def parse(line):", return_tensors="pt")["input_ids"]
    expected = tokenfx.diffuse(dllm_dir, ids, gen_length=8, block_length=4, compile=False).sequences
    assert data["token_ids"] == expected[0, ids.shape[1]:].tolist()


def test_generate_diffusion_with_the_cache_is_marked_approximate(capsys, dllm_dir):
    code, out, err = run(capsys, "generate", dllm_dir, "--prompt", "import os", "--max-new-tokens", "8",
                         "--diffusion", "threshold", "--block-length", "4", "--no-compile")
    assert code == 0, err
    assert out.startswith("import os")
    assert "APPROXIMATE: dual K/V cache" in " ".join(err.split())


def test_cli_diffusion_names_are_the_policies():
    from tokenfx.cli import DIFFUSION_POLICIES
    from tokenfx.runtime.unmasking import POLICIES

    assert set(DIFFUSION_POLICIES) == set(POLICIES)  # every --diffusion choice builds a policy


@pytest.mark.parametrize("argv,message", [
    (["--prompt", "x", "--max-new-tokens", "4"], "is a masked-diffusion LM (config is_causal: false, mask_token_id 4096)"),
    (["--prompt", "x", "--max-new-tokens", "6", "--diffusion", "vanilla", "--block-length", "4"],
     "gen_length 6 is not a multiple of block_length 4"),
    (["--prompt", "x", "--diffusion", "vanilla", "--speculate", "recycling"], "--speculate do(es) not combine"),
])
def test_generate_diffusion_bad_input_is_one_line_exit_2(capsys, dllm_dir, argv, message):
    code, out, err = run(capsys, "generate", dllm_dir, *argv)
    assert code == 2 and out == ""
    assert message in " ".join(err.split()) and "Traceback" not in err


@pytest.mark.parametrize("argv,message", [
    (["--diffusion", "vanilla"], "tokenfx:tiny-code is an autoregressive (causal) LM, not a masked-diffusion LM"),
    (["--no-cache"], "--no-cache and --block-length need --diffusion"),
])
def test_diffusion_options_on_an_autoregressive_model(capsys, argv, message):
    code, out, err = run(capsys, "generate", "tokenfx:tiny-code", "--prompt", "x", *argv)
    assert code == 2 and out == ""
    assert message in " ".join(err.split()) and "Traceback" not in err


def test_generate_tp_2_starts_two_ranks_and_matches_one_process(capfd):
    """``--tp 2`` launches two gloo ranks itself; rank 0 prints the JSON (the spawned ranks write to
    the process's stdout, hence capfd), and its tokens are the one-process greedy tokens."""
    prompt = "def parse(line):\n    "
    code = main(["generate", "tokenfx:tiny-code", "--prompt", prompt, "--max-new-tokens", "4", "--json", "--tp", "2",
                 "--no-compile"])
    out, _ = capfd.readouterr()
    assert code == 0
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == 1, out  # one rank speaks
    import tokenfx
    from tokenfx.frontends.load import load_tokenizer

    ids = load_tokenizer("tokenfx:tiny-code")(prompt, return_tensors="pt")["input_ids"]
    expected = tokenfx.generate("tokenfx:tiny-code", ids, max_new_tokens=4)[0, ids.shape[1]:].tolist()
    assert json.loads(lines[0])["token_ids"] == expected


def test_generate_tp_larger_than_the_cores_is_one_line_exit_2(capsys):
    from tokenfx.runtime.tensor_parallel import usable_cores

    tp = usable_cores() + 1
    code, out, err = run(capsys, "generate", "tokenfx:tiny-code", "--prompt", "x", "--tp", str(tp), "--no-compile")
    assert code == 2 and out == ""
    assert f"--tp {tp} on CPU needs at least {tp} cores (one per rank)" in err and len(err.strip().splitlines()) == 1
