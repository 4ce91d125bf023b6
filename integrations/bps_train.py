"""``python -m bayeslayers.integrations.bps_train``: the Bayesian Power Steering recipe (``bps/train.py``)."""

from .bps.train import cli

if __name__ == "__main__":
    cli()
