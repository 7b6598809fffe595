"""A run from its start to its report: `build` makes a Session, `session` is the API,
`train` the recipe behind `edgezo finetune`, `folder` and `snapshots` what survives a crash,
`guard` the memory budget at run time, `interrupt` Ctrl-C."""
