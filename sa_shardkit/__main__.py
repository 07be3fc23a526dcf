"""`python -m sa_shardkit ...` is the same as the `shardkit` console script."""

from .cli import main

main()
