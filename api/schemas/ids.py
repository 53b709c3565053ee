"""Path ids of stored things (files, batches, deployments, API keys). They become NATS KV keys, so anything
outside the alphabet our ids use is refused as the client's error before it reaches the store."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path

ResourceId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,128}$", description="An id this API issued.")]
