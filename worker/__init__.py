"""autoembed: keep pgvector embeddings in step with text in PostgreSQL."""

from __future__ import annotations

__version__ = "0.1.0"
