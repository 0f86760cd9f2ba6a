from setuptools import find_packages, setup

setup(
    name="megadoremi",
    version="0.1.0",
    description="DoReMi data-mixture optimisation on a DeepSpeed/Megatron-style GPT trainer",
    packages=find_packages(include=["megadoremi", "megadoremi.*"]),
    python_requires=">=3.10",
    # torch is deliberately not listed: an unpinned torch requirement makes pip pull the CUDA build.
    # The Makefile installs torch pinned first (see README).
    install_requires=["numpy", "sentencepiece", "pyyaml", "tqdm", "scipy"],
    extras_require={"mpi": ["mpi4py"], "train": ["deepspeed"], "hf": ["transformers", "safetensors", "protobuf", "accelerate", "lm-eval"]},
    entry_points={
        "console_scripts": [
            "megadoremi-train=megadoremi.train.__main__:main",
            "megadoremi-pipeline=megadoremi.workflow:main",
            "megadoremi-demo=megadoremi.demo:main",
            "megadoremi-compute-reference-losses=megadoremi.tools.compute_reference_losses:main",
            "megadoremi-plan-memory=megadoremi.tools.plan_memory:main",
            "megadoremi-export-hf=megadoremi.tools.export_hf:main",
            "megadoremi-import-hf=megadoremi.tools.export_hf:import_main",
            "megadoremi-eval=megadoremi.tools.evaluate:main",
            "megadoremi-make-eval-tasks=megadoremi.tools.make_eval_tasks:main",
            "megadoremi-preprocess=megadoremi.tools.preprocess_data:main",
            "megadoremi-train-tokenizer=megadoremi.tools.train_tokenizer:main",
            "megadoremi-merge-datasets=megadoremi.tools.merge_datasets:main",
            "megadoremi-inspect-dataset=megadoremi.tools.inspect_dataset:main",
            "megadoremi-make-demo-corpus=megadoremi.tools.make_demo_corpus:main",
        ]
    },
)
