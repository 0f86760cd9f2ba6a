"""The Hugging Face transformers form of a megadoremi GPT, both ways, and its tokenizer.

Export (``to_hf``): ``GPTNeoXForCausalLM`` for LayerNorm + GELU blocks (the presets): sequential residual
(``use_parallel_residual=False``), rotary on the whole head (``partial_rotary_factor=1``), no attention biases,
zero MLP biases, ``gelu_pytorch_tanh``; ``LlamaForCausalLM`` for RMSNorm + SwiGLU. Both: the padded vocabulary,
tied or separate output embeddings, the rotary base, the norm epsilon. Our fused ``qkv`` rows are laid out
(3, heads, head_dim); GPT-NeoX's are (heads, 3, head_dim), Llama's are three matrices. Our rotary rotates the
two halves of each head (``rotate_half``), as both transformers models do, so no permutation of q and k is
needed. Anything the target cannot compute exactly is refused with the reason (``ConversionError``).

Import (``from_llama``): a Llama checkpoint whose layout maps exactly (no grouped-query attention, no biases, no
rope scaling, hidden = heads x head_dim) as a megadoremi GPT config and state dict.

Tokenizer (``convert_tokenizer``): the run's SentencePiece model as a fast tokenizer built by transformers'
``SpmConverter.build_tokenizer_from_spm_proto`` (legacy prefixing, SentencePiece's normaliser, byte fallback),
with the end-of-document piece as EOS; ``check_tokenizer`` compares ids with SentencePiece on test strings.

transformers is imported inside the functions: the package itself does not need it to train.
"""

import torch

from megadoremi.model.gpt import GPTConfig
from megadoremi.utils.cli import UserError

NEOX, LLAMA = "GPTNeoXForCausalLM", "LlamaForCausalLM"
# Strings whose ids must equal SentencePiece's: plain text, code, whitespace runs, non-ASCII, bytes that need the
# byte fallback, control characters, an empty string.
TOKENIZER_TEST_STRINGS = (
    "Hello world. The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x  +  1\n\n\tif x:\n\t\tpass\n",
    "  leading spaces, trailing spaces   ",
    "multiple\n\n\nnewlines and\r\nwindows line ends",
    "naïve café — Ünïcödé, 日本語のテキスト, emoji 😀🚀",
    "\x00\x01\x7f bytes \u200b zero width",
    "",
    "a" * 200,
    "MIT License\n\nCopyright (c) 2024 The Authors\n",
    "3 + 4 = 7; 12 * 13 = 156",
)


class ConversionError(UserError):
    """A model or tokenizer that cannot be converted exactly; the message says why."""


def hf_architecture(config: GPTConfig) -> str:
    """The transformers architecture that computes ``config`` exactly, or ConversionError with the reason."""
    if config.norm == "layernorm" and config.mlp == "gelu":
        if config.num_heads * config.head_dim != config.d_model:
            raise ConversionError(f"GPT-NeoX needs heads x head_dim = d_model, got {config.num_heads} x "
                                  f"{config.head_dim} != {config.d_model}")
        return NEOX
    if config.norm == "rmsnorm" and config.mlp == "swiglu":
        return LLAMA
    raise ConversionError(f"norm {config.norm} with mlp {config.mlp}: neither GPT-NeoX (LayerNorm + GELU) nor "
                          "Llama (RMSNorm + SwiGLU) computes it")


def hf_config(config: GPTConfig, bos_token_id: int | None = None, eos_token_id: int | None = None,
              pad_token_id: int | None = None, dtype: str = "float32"):
    """The transformers config of ``config``'s architecture."""
    from transformers import GPTNeoXConfig, LlamaConfig

    common = {"vocab_size": config.padded_vocab_size, "hidden_size": config.d_model,
              "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
              "intermediate_size": config.ffn_dim, "max_position_embeddings": config.max_seq_length,
              "tie_word_embeddings": config.tied_embeddings, "bos_token_id": bos_token_id,
              "eos_token_id": eos_token_id, "pad_token_id": pad_token_id, "initializer_range": config.init_std,
              "dtype": dtype}
    architecture = hf_architecture(config)
    if architecture == NEOX:
        result = GPTNeoXConfig(**common, hidden_act="gelu_pytorch_tanh", layer_norm_eps=config.norm_eps,
                               use_parallel_residual=False, attention_bias=False,
                               rope_parameters={"rope_type": "default", "rope_theta": float(config.rope_base),
                                                "partial_rotary_factor": 1.0})
    else:
        result = LlamaConfig(**common, hidden_act="silu", rms_norm_eps=config.norm_eps,
                             num_key_value_heads=config.num_heads, head_dim=config.head_dim, attention_bias=False,
                             mlp_bias=False, rope_parameters={"rope_type": "default",
                                                              "rope_theta": float(config.rope_base)})
    result.architectures = [architecture]
    return result


def _check_names(state: dict, config: GPTConfig) -> None:
    from megadoremi.model.gpt import GPT

    with torch.device("meta"):
        expected = {name: tuple(p.shape) for name, p in GPT(config).state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConversionError(f"the weights do not match the model config: missing {missing[:4]}, unexpected "
                              f"{unexpected[:4]}")
    wrong = [f"{name} {tuple(state[name].shape)} != {shape}" for name, shape in expected.items()
             if tuple(state[name].shape) != shape]
    if wrong:
        raise ConversionError(f"the weights do not match the model config: {wrong[:3]}")


def to_hf(state: dict, config: GPTConfig, dtype: torch.dtype = torch.float32) -> dict:
    """megadoremi ``GPT`` state dict -> the transformers architecture's state dict (new tensors of ``dtype``)."""
    _check_names(state, config)
    architecture = hf_architecture(config)
    d, heads, head_dim = config.d_model, config.num_heads, config.head_dim
    inner = heads * head_dim

    def t(name):
        return state[name].detach().to(dtype=dtype, device="cpu").clone()

    out = {}
    if architecture == NEOX:
        prefix = "gpt_neox."
        out[prefix + "embed_in.weight"] = t("embedding.weight")
        for i in range(config.num_layers):
            src, dst = f"blocks.{i}.", f"{prefix}layers.{i}."
            for ours, theirs in (("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm")):
                out[dst + theirs + ".weight"], out[dst + theirs + ".bias"] = t(src + ours + ".weight"), \
                    t(src + ours + ".bias")
            qkv = t(src + "attn.qkv.weight").view(3, heads, head_dim, d).transpose(0, 1)  # -> (heads, 3, ...)
            out[dst + "attention.query_key_value.weight"] = qkv.reshape(3 * inner, d).contiguous()
            out[dst + "attention.dense.weight"] = t(src + "attn.out.weight")
            out[dst + "mlp.dense_h_to_4h.weight"] = t(src + "mlp.up.weight")
            out[dst + "mlp.dense_h_to_4h.bias"] = torch.zeros(config.ffn_dim, dtype=dtype)
            out[dst + "mlp.dense_4h_to_h.weight"] = t(src + "mlp.down.weight")
            out[dst + "mlp.dense_4h_to_h.bias"] = torch.zeros(d, dtype=dtype)
        out[prefix + "final_layer_norm.weight"], out[prefix + "final_layer_norm.bias"] = t("head.norm.weight"), \
            t("head.norm.bias")
    else:
        prefix = "model."
        out[prefix + "embed_tokens.weight"] = t("embedding.weight")
        for i in range(config.num_layers):
            src, dst = f"blocks.{i}.", f"{prefix}layers.{i}."
            out[dst + "input_layernorm.weight"] = t(src + "attn_norm.weight")
            out[dst + "post_attention_layernorm.weight"] = t(src + "mlp_norm.weight")
            q, k, v = t(src + "attn.qkv.weight").view(3, inner, d)
            out[dst + "self_attn.q_proj.weight"], out[dst + "self_attn.k_proj.weight"] = q.clone(), k.clone()
            out[dst + "self_attn.v_proj.weight"] = v.clone()
            out[dst + "self_attn.o_proj.weight"] = t(src + "attn.out.weight")
            out[dst + "mlp.gate_proj.weight"] = t(src + "mlp.gate.weight")
            out[dst + "mlp.up_proj.weight"] = t(src + "mlp.up.weight")
            out[dst + "mlp.down_proj.weight"] = t(src + "mlp.down.weight")
        out[prefix + "norm.weight"] = t("head.norm.weight")
    out["lm_head.weight"] = t("embedding.weight") if config.tied_embeddings else t("head.proj.weight")
    return out


def from_llama(hf_config_obj, hf_state: dict) -> tuple[GPTConfig, dict]:
    """A transformers Llama config and state dict -> (GPTConfig, GPT state dict), or ConversionError."""
    c = hf_config_obj
    if getattr(c, "model_type", None) != "llama":
        raise ConversionError(f"only Llama checkpoints can be imported, got model_type {getattr(c, 'model_type', None)!r}")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    rope = dict(getattr(c, "rope_parameters", None) or {})
    problems = []
    if kv_heads != c.num_attention_heads:
        problems.append(f"grouped-query attention ({kv_heads} key/value heads for {c.num_attention_heads} heads)")
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        problems.append("attention or MLP biases")
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope scaling {rope.get('rope_type')!r}")
    if c.hidden_act != "silu":
        problems.append(f"activation {c.hidden_act!r}")
    if c.vocab_size % 128:
        problems.append(f"vocabulary {c.vocab_size} is not a multiple of 128 (megadoremi pads the embedding to one)")
    if problems:
        raise ConversionError("this Llama checkpoint does not map exactly onto a megadoremi GPT: " + "; ".join(problems))
    tied = bool(getattr(c, "tie_word_embeddings", False))
    config = GPTConfig(vocab_size=c.vocab_size, num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads,
                       head_dim=head_dim, d_model=c.hidden_size, ffn_dim=c.intermediate_size,
                       max_seq_length=c.max_position_embeddings, mlp="swiglu", norm="rmsnorm", tied_embeddings=tied,
                       rope_base=float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))),
                       norm_eps=float(c.rms_norm_eps), init_std=float(getattr(c, "initializer_range", 0.02)))
    config.validate()

    def t(name):
        if name not in hf_state:
            raise ConversionError(f"the Llama checkpoint has no {name}")
        return hf_state[name].detach().to(torch.float32).clone()

    state = {"embedding.weight": t("model.embed_tokens.weight")}
    for i in range(config.num_layers):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        state[dst + "attn_norm.weight"] = t(src + "input_layernorm.weight")
        state[dst + "mlp_norm.weight"] = t(src + "post_attention_layernorm.weight")
        state[dst + "attn.qkv.weight"] = torch.cat([t(src + f"self_attn.{p}_proj.weight") for p in "qkv"])
        state[dst + "attn.out.weight"] = t(src + "self_attn.o_proj.weight")
        state[dst + "mlp.gate.weight"] = t(src + "mlp.gate_proj.weight")
        state[dst + "mlp.up.weight"] = t(src + "mlp.up_proj.weight")
        state[dst + "mlp.down.weight"] = t(src + "mlp.down_proj.weight")
    state["head.norm.weight"] = t("model.norm.weight")
    if not tied:
        state["head.proj.weight"] = t("lm_head.weight")
    _check_names(state, config)
    return config, state


# --- the tokenizer ------------------------------------------------------------------------------------------


def convert_tokenizer(sentencepiece_model: str):
    """The SentencePiece model as a ``PreTrainedTokenizerFast`` (ids equal SentencePiece's; EOS = its eos piece,
    the end-of-document id; BOS and padding when the model has them; no special tokens added on encode)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    proto = import_protobuf().ModelProto()
    with open(sentencepiece_model, "rb") as handle:
        proto.ParseFromString(handle.read())
    spec = proto.trainer_spec
    if spec.model_type == 1:  # unigram
        vocab = [(piece.piece, piece.score) for piece in proto.pieces]
    elif spec.model_type == 2:  # BPE
        vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    else:
        raise ConversionError(f"{sentencepiece_model}: SentencePiece model type {spec.model_type} (only BPE and "
                              "unigram convert to a fast tokenizer)")
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, merges=None, legacy=True)

    def piece(index: int) -> str | None:
        return proto.pieces[index].piece if 0 <= index < len(proto.pieces) else None

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=piece(spec.unk_id),
                                        eos_token=piece(spec.eos_id), bos_token=piece(spec.bos_id),
                                        pad_token=piece(spec.pad_id), add_bos_token=False, add_eos_token=False,
                                        clean_up_tokenization_spaces=False)
    return tokenizer


def check_tokenizer(tokenizer, sentencepiece_model: str, texts=TOKENIZER_TEST_STRINGS) -> None:
    """ConversionError naming the first text whose ids (or decoded text) differ from SentencePiece's."""
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=sentencepiece_model)
    for text in texts:
        expected, got = processor.encode(text), tokenizer.encode(text, add_special_tokens=False)
        if expected != got:
            raise ConversionError(f"converted tokenizer: ids differ from SentencePiece's on {text[:40]!r}: "
                                  f"{expected[:12]} vs {got[:12]}")
        if tokenizer.decode(got) != processor.decode(expected):
            raise ConversionError(f"converted tokenizer: decoding differs from SentencePiece's on {text[:40]!r}")


def dtype_from_name(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ConversionError(f"--dtype: one of {', '.join(dtypes)}, got {name!r}")
    return dtypes[name]
