"""Export to Hugging Face transformers and import back (issue 12): the exported model's float32 logits equal the
GPT's on the same tokens (max abs difference <= 1e-4) for both architectures, from model.pt and from real ZeRO-3
(2 ranks) and 2-stage pipeline checkpoints; greedy generation of 20 tokens is identical; the converted tokenizer's
ids equal SentencePiece's; a Llama checkpoint imported, exported back and compared; what cannot be represented
is refused with the reason."""

import json
import os
import subprocess
import sys

import pytest
import torch

from megadoremi.model.gpt import GPT, GPTConfig
from megadoremi.model.hf import LLAMA, NEOX, TOKENIZER_TEST_STRINGS, ConversionError, check_tokenizer, \
    convert_tokenizer, from_llama, hf_architecture, hf_config, to_hf
from megadoremi.tools.export_hf import LOGITS_ATOL, export, import_llama
from tests.helpers.launch import REPO_ROOT, clean_env

TINY = dict(vocab_size=500, num_layers=2, num_heads=4, head_dim=16, d_model=64, ffn_dim=128, max_seq_length=64)


def transformers_model(config: GPTConfig, state: dict):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(hf_config(config))
    hf_state = to_hf(state, config)
    missing, unexpected = model.load_state_dict(hf_state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model.eval()


def greedy(model, tokens: torch.Tensor, steps: int) -> list[int]:
    """Greedy continuation with a megadoremi GPT (full forward each step, no cache)."""
    out = tokens.clone()
    with torch.no_grad():
        for _ in range(steps):
            out = torch.cat([out, model(out)[:, -1:].argmax(-1)], dim=1)
    return out[0, tokens.shape[1]:].tolist()


@pytest.mark.parametrize("norm, mlp, tied, expected", [
    ("layernorm", "gelu", True, NEOX), ("layernorm", "gelu", False, NEOX),
    ("rmsnorm", "swiglu", True, LLAMA), ("rmsnorm", "swiglu", False, LLAMA)])
def test_logits_and_greedy_generation_match(norm, mlp, tied, expected):
    config = GPTConfig(**TINY, norm=norm, mlp=mlp, tied_embeddings=tied, rope_base=5000.0, norm_eps=1e-6)
    ours = GPT(config, seed=3).eval()
    with torch.no_grad():  # non-trivial norms (the initial ones are 1 and 0)
        for name, value in ours.named_parameters():
            if "norm" in name:
                value.add_(torch.randn(value.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    state = ours.state_dict()
    assert hf_architecture(config) == expected
    theirs = transformers_model(config, state)
    tokens = torch.randint(0, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (ours(tokens) - theirs(tokens).logits).abs().max().item()
    assert difference <= LOGITS_ATOL, difference
    prompt = tokens[:1, :8]
    generated = theirs.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert generated[0, 8:].tolist() == greedy(ours, prompt, 20)


def test_what_cannot_be_represented_is_refused():
    with pytest.raises(ConversionError, match="neither GPT-NeoX"):
        hf_architecture(GPTConfig(**TINY, norm="layernorm", mlp="swiglu"))
    with pytest.raises(ConversionError, match="heads x head_dim = d_model"):
        hf_architecture(GPTConfig(**{**TINY, "head_dim": 8}))
    config = GPTConfig(**TINY, norm="rmsnorm", mlp="swiglu")
    llama = hf_config(config)
    llama.num_key_value_heads = 2
    with pytest.raises(ConversionError, match="grouped-query attention"):
        from_llama(llama, {})
    with pytest.raises(ConversionError, match="the weights do not match"):
        to_hf({"embedding.weight": torch.zeros(3, 3)}, config)


def test_llama_imported_exported_back_and_compared(tmp_path):
    """A Llama checkpoint made by transformers itself (random weights, tied, 2 layers) -> model.pt -> transformers
    again: the same weights and logits."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    original = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                            rms_norm_eps=1e-6, tie_word_embeddings=True,
                                            rope_parameters={"rope_type": "default", "rope_theta": 500.0})).eval()
    hf_dir = tmp_path / "llama"
    original.config.save_pretrained(hf_dir)
    save_file({k: v.contiguous() for k, v in original.state_dict().items() if k != "lm_head.weight"},
              str(hf_dir / "model.safetensors"))
    model_pt = import_llama(str(hf_dir), str(tmp_path / "model.pt"))
    from megadoremi.model.io import load_exported_model

    config, state = load_exported_model(model_pt)
    assert (config.norm, config.mlp, config.tied_embeddings, config.rope_base) == ("rmsnorm", "swiglu", True, 500.0)
    ours = GPT(config).eval()
    ours.load_state_dict(state)
    tokens = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(tokens) - original(tokens).logits).abs().max().item() <= LOGITS_ATOL
        back = transformers_model(config, state)
        assert (back(tokens).logits - original(tokens).logits).abs().max().item() <= LOGITS_ATOL
    exported = to_hf(state, config)
    for name, value in original.state_dict().items():
        assert torch.equal(exported[name], value), name


def test_tokenizer_ids_equal_sentencepiece(tiny_corpus, tmp_path):
    import sentencepiece
    from transformers import AutoTokenizer

    model = tiny_corpus["tokenizer_model"]
    tokenizer = convert_tokenizer(model)
    check_tokenizer(tokenizer, model)  # raises on the first difference
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    processor = sentencepiece.SentencePieceProcessor(model_file=model)
    texts = list(TOKENIZER_TEST_STRINGS) + [open(path).read()[:2000] for path in
                                            sorted(os.path.join(tiny_corpus["root"], "corpus", f)
                                                   for f in os.listdir(os.path.join(tiny_corpus["root"], "corpus")))]
    for text in texts:
        assert loaded.encode(text, add_special_tokens=False) == processor.encode(text), text[:40]
    assert loaded.eos_token_id == processor.eos_id() and loaded.eos_token == processor.id_to_piece(processor.eos_id())
    assert "\u00e9" in loaded.decode(loaded.encode("café", add_special_tokens=False))


@pytest.fixture
def runs(zero3_run, pipeline_resume_runs):
    """Real checkpoints: ZeRO-3 on 2 ranks; 2 pipeline stages (ZeRO-0) stopped at step 3 and resumed to 6."""
    return {"zero3": (zero3_run, "step_00000003"), "pipeline": (pipeline_resume_runs["resumed"], "step_00000003")}


@pytest.mark.parametrize("layout", ["zero3", "pipeline"])
def test_export_from_a_deepspeed_checkpoint_of_any_layout(runs, tmp_path, layout):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megadoremi.model.io import load_exported_model
    from megadoremi.train.consolidate import checkpoint_weights

    run_dir, tag = runs[layout]
    out = tmp_path / "hf"
    report = export(str(run_dir / "checkpoints" / tag), str(out))  # read on one process
    assert report["architecture"] == NEOX and report["max_abs_logit_difference"] <= LOGITS_ATOL
    assert report["source"].endswith(tag)
    assert {"config.json", "model.safetensors", "tokenizer.json", "megadoremi_export.json"} <= set(os.listdir(out))
    # The checkpoint's weights as the exporter read them give the transformers model's logits; at the final step
    # they equal the finished run's model.pt, which the trainer writes in its own way (ZeRO-3: gathered).
    config, state = checkpoint_weights(str(run_dir / "checkpoints" / tag))
    if layout == "zero3":
        _, final = load_exported_model(str(run_dir))
        for name, value in final.items():
            torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)
    ours = GPT(config).eval()
    ours.load_state_dict(state)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = torch.randint(0, config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(tokens) - theirs(tokens).logits).abs().max().item() <= LOGITS_ATOL
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert theirs.config.eos_token_id == tokenizer.eos_token_id is not None


def test_cli_refuses_to_overwrite_and_exports_bfloat16(zero3_run, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    command = [sys.executable, os.path.join(REPO_ROOT, "tools", "export_hf.py"), str(zero3_run), str(out)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True, timeout=200)
    assert result.returncode == 2 and "exists (pass --force" in result.stderr, result.stderr[-2000:]
    result = subprocess.run(command + ["--force", "--dtype", "bfloat16"], cwd=REPO_ROOT, env=clean_env(),
                            capture_output=True, text=True, timeout=200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        assert {handle.get_tensor(key).dtype for key in handle.keys()} == {torch.bfloat16}
    assert not [name for name in os.listdir(tmp_path) if ".tmp-" in name]  # no temporary left behind
