"""Shard building: raw datasets -> WebDataset shards of one schema, and the readers (stream, index)."""
