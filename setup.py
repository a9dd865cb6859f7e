"""Packaging for star_elastic_jax (the ``star-elastic`` CLI).

Versions are pinned to the stack the project is tested on (SPEC section 6). ``torch`` is
pinned exactly: an unpinned ``torch`` resolves to the multi-GB CUDA build on Linux, so the
install scripts install ``torch==2.13.0`` (CPU) first and the extras then find it satisfied.
"""
import os

from setuptools import find_packages, setup

_HERE = os.path.dirname(os.path.abspath(__file__))


def _long_description() -> str:
    path = os.path.join(_HERE, "README.md")
    if not os.path.isfile(path):
        return ""
    with open(path, encoding="utf-8") as f:
        return f.read()


TORCH = ["torch==2.13.0", "transformers==5.23.0"]
TEST = ["pytest", "pytest-xdist", "hypothesis", *TORCH]
DEV = [*TEST, "ruff"]

setup(
    name="star-elastic-jax",
    version="0.1.0",
    description=(
        "JAX/Flax NNX Nemotron-H (hybrid Mamba2 / attention / MoE) with elastic nested sub-models "
        "(Star Elastic)"
    ),
    long_description=_long_description(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["star_elastic_jax*"]),
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "grain==0.2.18",
        "chex==0.1.92",
        "ml_collections==1.1.0",
        "numpy",
        "safetensors",
        "tqdm",
        "matplotlib",
        "tensorboardX",
    ],
    extras_require={
        "torch": TORCH,
        "test": TEST,
        "dev": DEV,
    },
    entry_points={
        "console_scripts": [
            "star-elastic=star_elastic_jax.cli:main",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.11",
    ],
)
