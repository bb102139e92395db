from lit_score.evaluate.cli import main

main()
