"""Install script for biasdiff.

Direct dependencies are pinned to versions that run on Python 3.11 (JAX 0.11
drops 3.11). `constraints.txt` pins the whole environment that CI tests.
"""

import setuptools

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorflow-datasets==4.9.10",
    "array-record==0.8.6",  # TFDS random-access reader, used without TensorFlow
    "einops==0.8.2",
    "ml-collections==1.1.0",
    "numpy==2.4.6",
    "matplotlib==3.11.2",
    "scikit-learn==1.9.1",  # ships the handwritten-digits images used offline
    "pillow==13.0.0",  # JPEG decoding for the CelebA folder loader
    "tqdm==4.70.1",
    "absl-py==2.5.1",
]

EXTRAS_REQUIRE = {
    "test": ["pytest==9.2.0"],
    "bench": ["faiss-cpu==1.15.1"],
    # CUDA 12 wheels for NVIDIA GPUs; TPU users install `jax[tpu]==0.10.2`.
    "cuda": ["jax[cuda12]==0.10.2"],
}

setuptools.setup(
    name="biasdiff",
    version="0.1.0",
    description=(
        "Measure biased generalization in diffusion models with paired "
        "training on disjoint data splits (JAX/Flax)."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.12",
    packages=setuptools.find_packages(include=["biasdiff", "biasdiff.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    license="Apache-2.0",
)
