"""Per-class WebDataset shards: format, converters, readers, episode sampling, demo data."""
