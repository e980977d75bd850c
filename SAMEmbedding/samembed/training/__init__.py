"""Self-supervised training of embedding networks (``samembed train``)."""
