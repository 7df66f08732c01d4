"""``python -m dconv`` runs the CLI."""

from dconv.cli import main

raise SystemExit(main())
