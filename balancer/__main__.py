"""``python -m balancer`` runs the command line."""

from balancer.cli import main

main()
