"""DreamBooth-BNN: diffusers-style DreamBooth / LoRA fine-tuning with Bayesian layers.

python -m bayeslayers.integrations.dreambooth [flags]      # or: bayeslayers-dreambooth [flags]
accelerate launch -m bayeslayers.integrations.dreambooth [flags]
"""

from .args import build_parser, parse_args


def main(args, step_callback=None):
    from .train import main as train_main

    return train_main(args, step_callback=step_callback)


def cli():
    result = main(parse_args())
    for key, value in result.items():
        print(f"{key}: {value}")


__all__ = ["build_parser", "parse_args", "main", "cli"]
