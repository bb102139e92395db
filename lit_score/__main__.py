"""``python -m lit_score``: the ``lit-score`` command."""
from lit_score.commands import main

main()
