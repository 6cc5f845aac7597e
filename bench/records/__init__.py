"""Run records: where they live (store), their layout (schema), how batches become one (assemble), and
how they are read back (read). Data flows down: evaluation writes through store and assemble, reports read
through read; nothing here imports the evaluation or the reports."""
