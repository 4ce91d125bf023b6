"""The corruption-stage study (``python -m bayeslayers.integrations.study``): plain and Bayesian DreamBooth and
LoRA on several few-shot subjects and seeds, evaluated along training. See :mod:`.cli`."""
