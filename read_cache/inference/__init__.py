"""A trained run on new text: `predict.predict(run_dir, texts)` dispatches to `read` (READ runs: backbone +
side network) or `baseline` (runs of `train --method`); `results` is what both return."""
