"""GLUE as the READ paper ran it: `specs` (each task's prompt, label words and metric), `data` (loading the hub
or a local folder, and the split recipes), `metrics` (GLUE's scores, through scikit-learn and scipy)."""
