"""SQL files shipped inside the autoembed package (see pyproject.toml)."""
