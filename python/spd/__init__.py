"""spd: Self-Policy Distillation for open-weight LLMs.

Calibrate a low-rank K/V capability subspace, generate under projection onto it, then LoRA-distill
the unmodified model on those generations. See README.md.

    import spd
    model, tok = spd.models.load("smollm2-135m")
    examples = spd.tasks.get_task("gsm8k").load(n=50)
    subspace = spd.calibrate(model, tok, examples, task="gsm8k")
    subspace.save("gsm8k.safetensors")
    with spd.project(model, subspace):          # K/V projected for every token processed
        model.generate(...)
"""
from ._version import __version__
from .errors import SpdError
from . import arch, models, tasks  # noqa: E402
from .calibrate import calibrate  # noqa: E402  (the function; the module stays importable as spd.calibrate)
from .subspace import Subspace  # noqa: E402
from .project import project  # noqa: E402  (the context manager; the package stays importable)

__all__ = ["__version__", "SpdError", "Subspace", "arch", "calibrate", "models", "project", "tasks"]
