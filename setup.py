"""megarank: Megatron-style, model-parallel training of bidirectional Llama cross-encoder rerankers."""
from setuptools import find_packages, setup

# megatron-core 0.17+ needs Python >= 3.12; 0.16.1 is the last release for 3.11 and the one the CPU shims
# in megarank/parallel/cpu.py were written against. Keep this pin exact.
MEGATRON_CORE = "megatron-core==0.16.1"

setup(
    name="megarank",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.10",
    packages=find_packages(include=["megarank", "megarank.*", "checkpoint_tools", "checkpoint_tools.*"]),
    package_data={
        "megarank": ["resources/**/*", "resources/*/*", "resources/*/*/*"],
        "checkpoint_tools": ["hf_modeling/*.py"],
    },
    include_package_data=True,
    install_requires=[
        MEGATRON_CORE,
        # No exact pin here so NGC containers keep their own CUDA torch; the CPU install path pins
        # torch==2.13.0 explicitly (README, .ci/run) so pip never pulls a CUDA build by accident.
        "torch>=2.6",
        "transformers>=4.56",
        "tokenizers",
        "safetensors",
        "pyyaml",
        "psutil",  # undeclared dependency of megatron-core's torch_dist checkpoint writer
        "numpy",
        "ir-measures==0.4.3",  # exact: RR@k cut-off semantics differ between backends (see megarank/scoring/metrics.py)
        "pytrec-eval-terrier>=0.5.11",
        "tensorboard",
        "matplotlib",  # megarank mine: the audit plot (Agg backend, no display)
        "pyarrow",  # data.format parquet / hf_disk / nemo_corpus: Arrow tables, memory-mapped where the file allows
    ],
    extras_require={
        # Transformer Engine (FP8 on Hopper). apex comes from the NGC PyTorch container; it has no usable wheel.
        "gpu": ["transformer-engine[pytorch]"],
        "test": ["pytest", "sentence-transformers", "accelerate", "gguf", "wandb",
                 "datasets"],  # tests/test_formats.py writes real save_to_disk folders and checks load_dataset's split
    },
    entry_points={
        "console_scripts": [
            "megarank=megarank.cli:main",
            "megarank-convert=checkpoint_tools.cli:main",
        ]
    },
)
