"""Registry service: models, versions, files, datasets and lineage."""
