"""Whether Triton kernels run under the interpreter (``TRITON_INTERPRET=1``: CPU tensors, no GPU), read once.

``@triton.jit`` reads the variable when it decorates a kernel, so the value at the first import of the kernels
is the one that holds for the process.
"""

import importlib.util
import os

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
