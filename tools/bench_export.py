"""Export time against a plain copy of the weights: is ``megadoremi-export-hf`` bounded by reading and writing?

    python tools/bench_export.py --preset 280m --vocab-size 256000 --workdir /tmp/bench_export [--json]

Writes a randomly initialised GPT of the preset as a run's ``model.pt`` (float32). Anchor, in the same run:
``shutil.copyfile`` of ``model.pt`` (the page cache dropped first when run as root). Timed: the export without
the tokenizer (there is no 256k-piece SentencePiece model here; converting one is independent of the weights)
and without the logits check (read ``model.pt``, convert, write safetensors and config.json), then the check
(loading the export in transformers and running both models on 2 x 64 tokens) apart. Reported as ratios to
the copy; importing transformers (once per process, a few seconds) is timed apart.
"""

import argparse
import json
import os
import shutil
import sys
import time

import torch

from megadoremi.utils.fs import drop_page_cache


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="280m")
    parser.add_argument("--vocab-size", type=int, default=256_000)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from megadoremi.model.gpt import GPT
    from megadoremi.model.io import write_model_file
    from megadoremi.model.presets import gpt_config_from_preset
    from megadoremi.tools.export_hf import check_logits, export

    run_dir = os.path.join(args.workdir, "run")
    os.makedirs(run_dir, exist_ok=True)
    config = gpt_config_from_preset(args.preset, args.vocab_size, 1024)
    model = GPT(config, seed=0)
    model_path = write_model_file({k: v.detach() for k, v in model.state_dict().items()}, config,
                                  os.path.join(run_dir, "model.pt"))
    del model
    size = os.path.getsize(model_path)

    dropped = drop_page_cache()
    started = time.perf_counter()
    shutil.copyfile(model_path, os.path.join(args.workdir, "copy.pt"))
    copy_s = time.perf_counter() - started
    os.remove(os.path.join(args.workdir, "copy.pt"))

    started = time.perf_counter()
    import safetensors.torch  # noqa: F401  (imported once per process: timed apart)
    import transformers  # noqa: F401

    import_s = time.perf_counter() - started
    out = os.path.join(args.workdir, "hf")
    drop_page_cache()
    started = time.perf_counter()
    report = export(run_dir, out, check=False, force=True, with_tokenizer=False)
    export_s = time.perf_counter() - started
    state = torch.load(model_path, weights_only=True)["state_dict"]
    started = time.perf_counter()
    difference = check_logits(out, config, state)
    check_s = time.perf_counter() - started
    result = {"preset": args.preset, "vocab_size": args.vocab_size, "parameters": config.num_parameters(),
              "model_pt_bytes": size, "page_cache_dropped": dropped, "copy_s": copy_s, "export_s": export_s,
              "export_over_copy": export_s / copy_s, "import_transformers_s": import_s, "check_s": check_s, "check_over_copy": check_s / copy_s,
              "export_parts_s": report["seconds"], "max_abs_logit_difference": difference,
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"{args.preset} ({config.num_parameters() / 1e6:.0f}M parameters, {size / 2**30:.2f} GiB): copy "
              f"{copy_s:.2f} s, export {export_s:.2f} s ({export_s / copy_s:.2f}x the copy), check {check_s:.2f} s "
              f"({check_s / copy_s:.2f}x); max |logit difference| {difference:.2g}")
    shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
