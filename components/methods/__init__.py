"""Self-supervised methods, one file each, behind one registry (see ``registry.py``)."""
