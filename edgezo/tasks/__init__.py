"""Tasks: their data, prompts and batches (`base`), the benchmark tasks (`sst2`, `superglue`,
`squad`), the user's own files (`user`, `chat`), and `make.make_task`, which finds one by
name or path."""
