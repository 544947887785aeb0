"""Small mechanisms every stage uses, each written once: `files` (atomic writes, fsync, the one folder lock),
`device` (where and in which precision torch runs), `energy` (wall, CPU, energy and memory meters)."""
