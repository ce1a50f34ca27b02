"""saemnesia_jax: supervised sparse autoencoders for concept unlearning, in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="saemnesia_jax",
    version="0.1.0",
    description="JAX/Flax SAEmnesia and SAeUron concept unlearning for diffusion models",
    python_requires=">=3.10",
    packages=find_packages(include=["saemnesia_jax", "saemnesia_jax.*"]),
    package_data={"saemnesia_jax": ["assets/**/*"]},
    include_package_data=True,
    install_requires=[
        "jax>=0.7",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "tensorstore>=0.1.70",
        "ml_collections>=1.0",
        "numpy>=1.26",
        # The Flax classes of diffusers are removed in 0.40 and Flax support in
        # transformers in 5.0: every use of them sits in saemnesia_jax/diffusion/models.py.
        "diffusers>=0.30,<0.40",
        "transformers>=4.40,<5",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "absl-py",
        "tqdm",
        "Pillow",
        "matplotlib",
        # Training curves (saemnesia_jax/runtime/tensorboard.py): its event-file
        # protos, record framing and reader; no TensorFlow, never imported.
        # About 12 MB, 40 MB more with its data server and grpcio; tested with 2.21.
        "tensorboard",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout", "pytest-xdist"],
        # CPU torch, only to read or write PyTorch weights.  On these machines
        # install it first with `pip install torch==2.13.0` (a local wheel).
        "torch": ["torch>=2.1"],
        # libtpu, the TPU compiler: dry runs for a Cloud TPU slice from any host
        # (--config.topology; saemnesia_jax/runtime/topology.py). jax[tpu] pins
        # the libtpu built for its own version, so the bound is jax's above
        # (pip keeps the installed jax when it satisfies it: 0.10.2 -> libtpu
        # 0.0.42.1, about 680 MB). JAX stays on the CPU on a host without a TPU.
        "tpu": ["jax[tpu]>=0.7"],
    },
)
