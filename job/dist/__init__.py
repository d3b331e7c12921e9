"""Several ranks: the worker's view of its peers (`group`) and the elastic launcher that starts them
(`launch`), with the exit code of the rank that failed first."""
