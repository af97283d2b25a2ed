"""sparkctl's wing: the operator's command line, one module per command family."""
