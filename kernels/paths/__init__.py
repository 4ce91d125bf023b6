"""Which path a Triton call takes: the fusion policy (``fusion.py``), the Triton paths and the choice among them
(``fused.py``), timing them on the user's GPU (``timing.py``)."""
