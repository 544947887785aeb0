"""Stage two: READ's side network trained from the cache alone (never the backbone).

`side_network` (the model and its heads), `reader` (batches from the store), `engine` (the epoch loop and
early stopping every training shares), `runs` (run folders and what they record), `train` (one run),
`sweep` (many side networks over one read of the cache), `checkpoint` (resume after an interruption)."""
