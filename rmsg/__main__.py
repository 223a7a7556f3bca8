"""``python -m rmsg`` runs the CLI."""

from .cli import main

main()
