"""Optional files of a local folder or a Hub repository, found without hiding network failures.

transformers' ``cached_file(..., _raise_exceptions_for_connection_errors=False)`` and ``has_file`` answer "absent"
when the network fails, so a hiccup would silently drop an optional file (``llm2vec_config.json``, a tokenizer)
and defaults would apply. Here only "the repository has no such file" is ``None``; a connection error raises.
Offline (``HF_HUB_OFFLINE=1`` or ``local_files_only``) the local cache answers. This file imports
huggingface_hub, which transformers itself requires, so the remote code still loads wherever transformers does.
"""

from __future__ import annotations

import os
from typing import Any

from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError
from transformers.utils import logging as hf_logging

logger = hf_logging.get_logger(__name__)

# Keyword arguments of from_pretrained that locate files.
HUB_FILE_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


def optional_file(path_or_repo: str | os.PathLike, filename: str, **hub_kwargs: Any) -> str | None:
    """Local path of ``filename`` in a folder or Hub repo (downloaded if needed), ``None`` if the repo has none.

    ``hub_kwargs``: ``revision``, ``cache_dir``, ``token``, ``subfolder``, ``local_files_only``, ``force_download``
    (others are ignored). A connection error raises; offline, a file the cache does not know is taken as absent
    with a warning, since nothing can tell.
    """
    kwargs = {key: value for key, value in hub_kwargs.items() if key in HUB_FILE_KWARGS and value is not None}
    subfolder = kwargs.pop("subfolder", "") or ""
    path = str(path_or_repo)
    if os.path.isdir(path):
        candidate = os.path.join(path, subfolder, filename)
        return candidate if os.path.isfile(candidate) else None
    if kwargs.pop("local_files_only", False) or constants.HF_HUB_OFFLINE:
        cached = try_to_load_from_cache(path, filename if not subfolder else f"{subfolder}/{filename}",
                                        cache_dir=kwargs.get("cache_dir"), revision=kwargs.get("revision"))
        if isinstance(cached, str):
            return cached
        if cached is None:
            logger.warning(f"Offline: the local cache does not record whether {path} has {filename}; going on "
                           "without it. Download the repository once online (or unset HF_HUB_OFFLINE) to be sure.")
        return None
    try:
        return hf_hub_download(path, filename, subfolder=subfolder or None, **kwargs)
    except EntryNotFoundError:
        return None
