"""The base layer, below data.py: errors, files and number formatting (common), shared defaults, record
formats and readers, the embedded task and packing. Imports nothing of the project but srpo.py."""
