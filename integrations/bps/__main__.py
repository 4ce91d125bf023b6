"""``python -m bayeslayers.integrations.bps``: the Bayesian Power Steering recipe (``train.py``)."""

from .train import cli

if __name__ == "__main__":
    cli()
