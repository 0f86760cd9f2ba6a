"""Export a megadoremi model to a Hugging Face transformers directory, and import a Llama checkpoint back.

    megadoremi-export-hf RUN_DIR_OR_CHECKPOINT OUTDIR [--dtype float32|bfloat16] [--tokenizer-model SP.model]
    megadoremi-import-hf HF_DIR MODEL_PT

Export writes ``config.json`` (``GPTNeoXForCausalLM`` for LayerNorm + GELU, ``LlamaForCausalLM`` for RMSNorm +
SwiGLU; see ``megadoremi.model.hf``), ``model.safetensors``, the run's SentencePiece model as a fast tokenizer
(``tokenizer.json``; its end-of-document piece is EOS) and ``megadoremi_export.json`` (source, architecture and
the checks). ``AutoModelForCausalLM.from_pretrained(OUTDIR)`` and ``AutoTokenizer.from_pretrained(OUTDIR)`` load
it with no custom code. The source is a finished run's ``model.pt`` (or its run directory) or a DeepSpeed
checkpoint of any layout (``megadoremi.train.consolidate``). The tokenizer is the run's ``data.tokenizer_model``
(from ``RUN_DIR/config.yaml``) unless ``--tokenizer-model`` names one. Before the directory appears (written
under a temporary name, then renamed) it is loaded back: float32 logits must equal the megadoremi model's to
``LOGITS_ATOL`` on test tokens, and the tokenizer's ids SentencePiece's on test strings. Exit status 2 with one
line for what cannot be exported (a layout transformers cannot compute, a damaged checkpoint, a missing tokenizer).

Import reads a Llama directory (config.json and safetensors) whose layout maps exactly and writes a megadoremi
``model.pt`` (usable as a DoReMi reference, or to continue training with data tokenized by the same tokenizer).
"""

import argparse
import json
import os
import shutil
import time

import torch

from megadoremi.utils.cli import UserError, run_cli
from megadoremi.utils.logging import get_logger

logger = get_logger(__name__)

LOGITS_ATOL = 1e-4  # float32 export vs the megadoremi model, the same tokens


def _run_dir_of(path: str) -> str | None:
    """The run directory a model file or checkpoint belongs to (the one holding config.yaml), if any."""
    path = os.path.abspath(path)
    for _ in range(3):
        if os.path.isfile(os.path.join(path, "config.yaml")):
            return path
        path = os.path.dirname(path)
    return None


def find_tokenizer_model(source: str, given: str | None) -> str:
    if given:
        if not os.path.isfile(given):
            raise UserError(f"--tokenizer-model {given}: no such file")
        return given
    run_dir = _run_dir_of(source)
    if run_dir:
        import yaml

        with open(os.path.join(run_dir, "config.yaml")) as handle:
            model = ((yaml.safe_load(handle) or {}).get("data") or {}).get("tokenizer_model")
        if model and os.path.isfile(model):
            return model
        if model:
            raise UserError(f"{run_dir}/config.yaml names the tokenizer {model}, which does not exist here; pass "
                            "--tokenizer-model")
    raise UserError(f"{source}: no tokenizer found (the run's config.yaml names none); pass --tokenizer-model")


def check_logits(out_dir: str, config, state: dict, seed: int = 0) -> float:
    """max |logits| difference between the exported model (loaded by transformers, float32) and the GPT."""
    from transformers import AutoModelForCausalLM

    from megadoremi.model.gpt import GPT

    ours = GPT(config)
    ours.load_state_dict(state)
    ours.eval()
    theirs = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    theirs.eval()
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (2, min(64, config.max_seq_length)), generator=generator)
    with torch.no_grad():
        difference = (ours(tokens) - theirs(tokens).logits).abs().max().item()
    return difference


def export(source: str, out_dir: str, dtype_name: str = "float32", tokenizer_model: str | None = None,
           check: bool = True, force: bool = False, with_tokenizer: bool = True) -> dict:
    from safetensors.torch import save_file

    from megadoremi.model.hf import ConversionError, check_tokenizer, convert_tokenizer, dtype_from_name, \
        hf_architecture, hf_config, to_hf
    from megadoremi.train.consolidate import load_weights

    started = time.perf_counter()
    dtype = dtype_from_name(dtype_name)
    if os.path.exists(out_dir) and not force:
        raise UserError(f"{out_dir}: exists (pass --force to replace it)")
    config, state, read_from = load_weights(source)
    architecture = hf_architecture(config)
    loaded = time.perf_counter()
    tokenizer, sp_model, eos, bos = None, None, None, None
    if with_tokenizer:
        import sentencepiece

        sp_model = find_tokenizer_model(source, tokenizer_model)
        processor = sentencepiece.SentencePieceProcessor(model_file=sp_model)
        if processor.get_piece_size() != config.vocab_size:
            raise ConversionError(f"{sp_model}: {processor.get_piece_size()} pieces, the model was trained with a "
                                  f"vocabulary of {config.vocab_size}")
        tokenizer = convert_tokenizer(sp_model)
        check_tokenizer(tokenizer, sp_model)
        eos = processor.eos_id() if processor.eos_id() >= 0 else None
        bos = processor.bos_id() if processor.bos_id() >= 0 else None
    hf_state = to_hf(state, config, dtype)
    if config.tied_embeddings:
        del hf_state["lm_head.weight"]  # tied to the input embedding (transformers ties it on load)
    tmp = f"{out_dir.rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        hf_config(config, bos_token_id=bos, eos_token_id=eos, dtype=dtype_name).save_pretrained(tmp)
        save_file(hf_state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        written = time.perf_counter()
        report = {"source": os.path.abspath(read_from), "architecture": architecture, "dtype": dtype_name,
                  "tokenizer_model": sp_model and os.path.abspath(sp_model), "vocab_size": config.vocab_size,
                  "padded_vocab_size": config.padded_vocab_size, "eos_token_id": eos,
                  "tokenizer_check": "ids and decoding equal SentencePiece's on the test strings" if tokenizer
                  else "no tokenizer exported (--no-tokenizer)",
                  "seconds": {"read": loaded - started, "convert_and_write": written - loaded}}
        if check and dtype == torch.float32:
            difference = check_logits(tmp, config, state)
            report["max_abs_logit_difference"] = difference
            if not difference <= LOGITS_ATOL:
                raise ConversionError(f"export check: transformers' logits differ from the model's by {difference:.3g} "
                                      f"(> {LOGITS_ATOL}); nothing written")
            report["seconds"]["check"] = time.perf_counter() - written
        with open(os.path.join(tmp, "megadoremi_export.json"), "w") as handle:
            json.dump(report, handle, indent=1)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("exported %s (%s, %s) to %s", read_from, architecture, dtype_name, out_dir)
    return report


def import_llama(hf_dir: str, model_path: str) -> str:
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from megadoremi.model.hf import from_llama
    from megadoremi.model.io import write_model_file

    files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors")) if os.path.isdir(hf_dir) else []
    if not files:
        raise UserError(f"{hf_dir}: no *.safetensors weights (a transformers directory saved with safetensors)")
    state = {}
    for name in files:
        state.update(load_file(os.path.join(hf_dir, name)))
    config = AutoConfig.from_pretrained(hf_dir)
    if config.tie_word_embeddings and "lm_head.weight" not in state:
        state["lm_head.weight"] = state.get("model.embed_tokens.weight")
    model_config, gpt_state = from_llama(config, state)
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        # The embedding rows are the tokenizer's vocabulary padded to a multiple of 128: keep the real size.
        from transformers import AutoTokenizer

        size = len(AutoTokenizer.from_pretrained(hf_dir))
        if size <= model_config.vocab_size and -(-size // 128) * 128 == model_config.padded_vocab_size:
            model_config.vocab_size = size
    return write_model_file(gpt_state, model_config, model_path)


def _export_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="megadoremi-export-hf", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("source", help="a run directory, its model.pt, a checkpoints directory or one checkpoint")
    parser.add_argument("out_dir")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--tokenizer-model", default=None, help="SentencePiece model (default: the run's)")
    parser.add_argument("--no-check", action="store_true", help="skip loading the export back to compare logits")
    parser.add_argument("--no-tokenizer", action="store_true", help="the weights and config only")
    parser.add_argument("--force", action="store_true", help="replace OUTDIR if it exists")
    args = parser.parse_args(argv)
    report = export(args.source, args.out_dir, args.dtype, args.tokenizer_model, check=not args.no_check,
                    force=args.force, with_tokenizer=not args.no_tokenizer)
    print(json.dumps(report, indent=1))
    return 0


def _import_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="megadoremi-import-hf",
                                     description="Import a Llama transformers checkpoint as a megadoremi model.pt")
    parser.add_argument("hf_dir")
    parser.add_argument("model_path", help="where to write the model.pt")
    args = parser.parse_args(argv)
    print(import_llama(args.hf_dir, args.model_path))
    return 0


def main(argv=None) -> int:
    return run_cli("megadoremi-export-hf", _export_main, argv)


def import_main(argv=None) -> int:
    return run_cli("megadoremi-import-hf", _import_main, argv)
