"""Console logging for the command line and the service: our own messages, without the known-harmless
warnings the libraries print on every run (they bury the lines a user needs). `--verbose` shows all.

Only warnings listed here are dropped, each one matched on its text, so a new or real warning still
reaches the user."""

from __future__ import annotations

import logging
import os
import warnings

# (message regex, category) of warnings that say nothing a user can act on.
HARMLESS_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # diffusers/transformers deprecation chatter about their own internals
    (r".*is deprecated and will be removed in version.*", FutureWarning),
    (r".*`resume_download` is deprecated.*", FutureWarning),
    (r".*upcast_vae.*", FutureWarning),
    # the tiny models and fp32 on CPU: safety checker, attention and xformers notices
    (r".*safety checker.*", UserWarning),
    (r".*xFormers.*", UserWarning),
    (r".*torch\.utils\._pytree\._register_pytree_node is deprecated.*", UserWarning),
    (r".*TypedStorage is deprecated.*", UserWarning),
    # gsplat's JIT build notice when its kernels are not prebuilt (we fall back and say so once)
    (r".*gsplat.*CUDA.*", UserWarning),
    # scikit-image / scipy on a degenerate (tiny) volume
    (r".*Mean of empty slice.*", RuntimeWarning),
    (r".*invalid value encountered in divide.*", RuntimeWarning),
)
# Library loggers that report progress bars and notices at INFO/WARNING level.
NOISY_LOGGERS = ("diffusers", "transformers", "huggingface_hub", "accelerate", "peft", "PIL", "urllib3", "httpx", "filelock")


def silence_harmless_warnings() -> None:
    for pattern, category in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)


def setup_console_logging(verbose: bool = False) -> None:
    """Our INFO lines on the console; library chatter only with `verbose`."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")
    if verbose:
        return
    silence_harmless_warnings()
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def quiet_diffusion_libraries() -> None:
    """No model-loading progress bars from diffusers/transformers (our own progress lines say the
    same). Imports their logging modules, so it is called only by commands that load models anyway."""
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    except ImportError:
        pass
