"""Quality evaluation: reference sets (`references.py`) and the metrics scored on them (`metrics.py`)."""
