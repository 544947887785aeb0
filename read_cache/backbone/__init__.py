"""The frozen model of stage one (and of the online paths): `load` (a hub id or folder -> a frozen `Backbone`),
`inputs` (the task's text as token ids), `forward` (the forward pass over length-grouped batches), `hub`
(what needs the hub, checked at once). Stage two (`read_cache.training`) never imports this package."""
