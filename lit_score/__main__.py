"""``python -m lit_score``: the ``lit-score`` command."""
from lit_score.cli.main import main

main()
