"""What the commands of the trainer image set up the same way: the log format and the scratch folder.

``kubetune train`` and the publishing commands (``publish``, ``pull``, ``fetch-model``) log through
:func:`setup_logging`, and put large temporary files (the prepared data, an image layer being
built) in ``$KUBETUNE_WORK_DIR`` when it is set.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Final

#: Env var naming a folder for large temporary files (the prepared data, an image layer being built);
#: the system's temporary folder when unset.
WORK_DIR_ENV: Final = "KUBETUNE_WORK_DIR"


def setup_logging() -> None:
    """Readable, timestamped lines on standard error; libraries' chatter kept to warnings."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("transformers", "datasets", "deepspeed", "DeepSpeed", "torch.distributed", "accelerate", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
