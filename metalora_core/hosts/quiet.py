"""transformers' notice that an image processor falls back to its PIL version, dropped where the
project imports diffusers' FLUX pipeline.

Importing ``diffusers.FluxPipeline`` loads all of diffusers' FLUX pipelines, which name CLIP's
and SigLIP's image processors; without torchvision (not a dependency of this project) transformers
5 then logs, once per processor, that it uses the PIL version. The project never runs those
processors through that import, so on every CLI run the notice only alarms. Only that message is
dropped, only while the import runs; other transformers messages pass.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

_LOGGER = "transformers.utils.import_utils"  # where transformers' lazy module logs the fallback
_NOTICE = "requires torchvision (not installed); falling back to"


def _not_the_fallback_notice(record: logging.LogRecord) -> bool:
    return _NOTICE not in record.getMessage()


@contextmanager
def no_torchvision_notice() -> Iterator[None]:
    """Within the block, transformers' "requires torchvision (not installed); falling back to
    ...Pil" notice is dropped; nothing else is."""
    logger = logging.getLogger(_LOGGER)
    logger.addFilter(_not_the_fallback_notice)
    try:
        yield
    finally:
        logger.removeFilter(_not_the_fallback_notice)
