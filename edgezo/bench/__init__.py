"""`edgezo bench`: ZO-Bench's study (optimizers x schemes x tasks) as data-driven suites."""
