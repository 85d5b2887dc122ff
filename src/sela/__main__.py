"""``python -m sela`` (also what ``torchrun -m sela`` runs)."""

from sela.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
