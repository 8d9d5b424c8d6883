"""mpmoe experts: merge, compress and split the experts of a checkpoint."""
