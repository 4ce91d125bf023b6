"""bayeslayers: Triton-fused Bayesian layers for fine-tuning diffusion models.

The source tree keeps `kernels/` and `integrations/` at the top level; both install
under the single import namespace `bayeslayers` (`bayeslayers.kernels`,
`bayeslayers.integrations`). No top-level `kernels` module is ever installed.
"""

from setuptools import find_packages, setup

PACKAGE_DIRS = {
    "bayeslayers": "bayeslayers",
    "bayeslayers.kernels": "kernels",
    "bayeslayers.integrations": "integrations",
}


def _packages():
    names = []
    for package, directory in PACKAGE_DIRS.items():
        names.append(package)
        names.extend(f"{package}.{sub}" for sub in find_packages(directory))
    return names


setup(
    name="bayeslayers",
    version="0.1.0",
    description="Triton-fused Bayesian neural-network layers for fine-tuning diffusion models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",  # tested: 3.11, 3.12 (make compat)
    packages=_packages(),
    package_dir=PACKAGE_DIRS,
    package_data={
        "bayeslayers.integrations": ["tiny_sd/assets/**/*", "tiny_sd/assets/*"],
        "bayeslayers.kernels.cpu": ["csrc/*.cpp"],
    },
    include_package_data=True,
    install_requires=[
        # Ranges span the versions `make compat` tests (docs/requirements.md): torch 2.11 and 2.13, triton 3.6 and 3.9.
        "torch>=2.11,<2.14",
        "triton>=3.6,<3.10; platform_system == 'Linux'",
        "numpy",
        "ninja",  # builds the C++ CPU kernels on first use
        "safetensors",  # save() / load()
    ],
    extras_require={
        "diffusers": [
            "diffusers>=0.42,<0.43",
            "transformers>=5.17,<5.24",
            "accelerate>=1.15,<1.16",
            "peft>=0.21,<0.22",
            "safetensors",
            "pillow",
            "tqdm",
            "matplotlib",  # the recipes' training-curve and std-map images
        ],
        "bench": ["matplotlib"],
        "test": ["pytest", "build", "wheel", "ruff==0.17.6", "hypothesis>=6.100"],
    },
    entry_points={
        "bayeslayers.presets": [
            "dreambooth-bnn=bayeslayers.integrations.presets:DREAMBOOTH_BNN",
            "dreambooth-bnn-lora=bayeslayers.integrations.presets:DREAMBOOTH_BNN_LORA",
            "clip-text-bnn=bayeslayers.integrations.presets:CLIP_TEXT_BNN",
            "dreambooth-bnn-peft=bayeslayers.integrations.presets:DREAMBOOTH_BNN_PEFT",
            "causal-lm-bnn-peft=bayeslayers.integrations.presets:CAUSAL_LM_BNN_PEFT",
        ],
        "console_scripts": [
            "bayeslayers-dreambooth=bayeslayers.integrations.dreambooth:cli",
            "bayeslayers-sample=bayeslayers.integrations.sample:cli",
            "bayeslayers-bps=bayeslayers.integrations.bps.train:cli",
            "bayeslayers-eval=bayeslayers.integrations.metrics.cli:cli",
        ],
    },
)
