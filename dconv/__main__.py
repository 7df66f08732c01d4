"""``python -m dconv`` runs the CLI."""

from dconv.cli import run

run()
