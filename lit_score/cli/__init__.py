"""The ``lit-score`` command line: subcommands, experiment YAMLs, SLURM submission and the tools beside training."""
